"""The ``tokenskip`` subcommands that have no library module of their own to live in.

Every subcommand, here or in its library module (``tokenskip.train.job``, ``tokenskip.evaluate``,
``tokenskip.export``), is one module registered in :data:`tokenskip.cli.COMMANDS`: its docstring is
the command's description, ``add_arguments(parser)`` declares its options and
``run_command(args) -> int`` does the work and returns an exit code (:mod:`tokenskip.exit_codes`).
The CLI maps the errors they raise (a user error, a held lease, missing capacity, an interrupt) to
their exit codes. This module holds what several commands share.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def json_object(text: str) -> dict[str, Any]:
    """An argparse type for fsspec options given as JSON (``--storage-options``): a bad value stops
    the command at parsing, before anything is read or written."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expects a JSON object, got {text!r}")
    return value


def add_skip_model_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-model-check",
        action="store_true",
        help="start without checking that the models resolve (a local folder, the local Hugging Face "
        "cache or the hub); by default a model that cannot be resolved is an error before any engine starts",
    )


def one_line(exc: BaseException) -> str:
    """An exception as one line: pydantic's field errors joined, other messages' lines joined."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors()]
            return "; ".join(parts)
        except Exception:  # not pydantic's errors(): fall back to the message
            pass
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return text or type(exc).__name__
