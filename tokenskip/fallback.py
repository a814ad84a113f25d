"""Batch first, then row by row: one bad input must not fail the other rows of its batch.

Engines and scorers are called on whole batches (that is what makes them fast), but some failures
belong to one input: a prompt that breaks a kernel, a text the scorer chokes on. Every batch-then-row
retry in the project goes through :func:`batch_then_rows`: the batch is tried once; if it raises,
each row is tried alone, and a row that still fails becomes the caller's error value for that row
(an error row with a reason), so its neighbours keep their results.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TypeVar

log = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


def error_text(exc: BaseException) -> str:
    """The ``detail`` an error row carries for ``exc``."""
    return f"{type(exc).__name__}: {exc}"


def batch_then_rows(
    run: Callable[[list[Item]], Sequence[Result]],
    items: list[Item],
    row_error: Callable[[Item, Exception], Result],
    *,
    what: str,
) -> list[Result]:
    """``run(items)``: one result per item, in order. If it raises, ``run([item])`` for each item;
    an item that fails alone too gets ``row_error(item, exception)`` instead of a result.

    A batch call that returns another number of results than it got items is a bug in ``run``, not a
    bad row: it raises. ``what`` names the work in the log line ("scoring", "generation").
    """
    if not items:
        return []
    try:
        results = list(run(items))
    except Exception as batch_error:  # isolate the failing row(s) below
        log.warning(
            "%s failed for a batch of %d (%s); retrying row by row", what, len(items), error_text(batch_error)
        )
    else:
        if len(results) != len(items):
            raise RuntimeError(f"{what} returned {len(results)} results for {len(items)} inputs")
        return results
    out: list[Result] = []
    for item in items:
        try:
            (result,) = run([item])
        except Exception as row_error_exc:  # this row's own failure: its error value
            out.append(row_error(item, row_error_exc))
        else:
            out.append(result)
    return out
