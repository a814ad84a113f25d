"""``tokenskip show``: a committed run's summary and a few examples, readable in a terminal.

For each example (:mod:`tokenskip.examples`, which the HTML report draws too): the question, the
original CoT, and its version at every ratio with the words that pruning dropped marked
``[-like this-]`` (a partly pruned word: ``step[--by-step-]``), so what compression did is visible
without writing pyarrow code.
"""

from __future__ import annotations

import textwrap

from tokenskip.examples import Example, Mark, Piece, diff_pruned, read_examples
from tokenskip.storage import StorageConfig, read_manifest

DROPPED = "[-{}-]"
# Never from tokenskip's scorers, which only delete (see tokenskip.examples.Mark.ADDED).
ADDED = "{{+{}+}}"
_FORMAT = {Mark.KEPT: "{}", Mark.DROPPED: DROPPED, Mark.ADDED: ADDED}


def mark_dropped(original: str, kept: str) -> str:
    """``original`` with the words missing from ``kept`` marked ``[-like this-]``."""
    return _marked(diff_pruned(original, kept))


def _marked(pieces: list[Piece]) -> str:
    # One space for any whitespace: the terminal text is re-wrapped anyway.
    return "".join((" " if p.space else "") + _FORMAT[p.mark].format(p.text) for p in pieces)


def _block(label: str, text: str, width: int) -> list[str]:
    body = textwrap.wrap(text, width=width - 4, break_long_words=False, break_on_hyphens=False) or [""]
    return [label] + ["    " + line for line in body]


def render_examples(examples: list[Example], width: int = 100) -> list[str]:
    lines: list[str] = []
    for n, example in enumerate(examples, 1):
        lines.append(f"--- example {n}/{len(examples)}  key {example.key}  problem {example.problem_id}")
        lines += _block(f"question (gold answer {example.answer}):", example.question, width)
        lines += _block(f"original CoT ({example.original_tokens} tokens):", example.cot, width)
        for c in example.compressions:
            label = (
                f"ratio {c.target_ratio:g} (achieved {c.achieved_ratio:.2f}, {c.tokens} tokens; "
                f"dropped words {DROPPED.format('marked')}):"
            )
            text = f"{_marked(c.reasoning)} {c.answer_tail}".strip()
            lines += _block(label, text, width)
    return lines


def show_run(
    config: StorageConfig, dataset: str, run_id: str | None = None, examples: int = 3, width: int = 100
) -> str:
    """The run's summary and its first ``examples`` kept samples (LATEST's run when ``run_id`` is None)."""
    manifest = read_manifest(config, dataset, run_id)
    counts = manifest.counts or {}
    lines = [
        f"run {manifest.run_id} of dataset {dataset} (committed {manifest.created_at[:19].replace('T', ' ')} UTC, "
        f"model {manifest.model})",
        f"  rows: data {manifest.rows.get('data', 0)}, rejects {manifest.rows.get('rejects', 0)}, "
        f"errors {manifest.rows.get('errors', 0)}",
    ]
    if counts:
        lines += [
            f"  kept {counts.get('kept_samples')} samples from {counts.get('kept_problems')} problems "
            f"(acceptance {counts.get('acceptance_rate', 0):.1%} of {counts.get('graded_samples')} graded)",
            f"  rejects by reason {counts.get('reject_rows_by_reason', counts.get('rejects_by_reason'))}; "
            f"errors by reason {counts.get('errors_by_reason')}",
            f"  achieved ratio by target {counts.get('achieved_ratio')}",
        ]
    shown = read_examples(config, dataset, manifest.run_id, examples)
    if shown:
        lines += render_examples(shown, width)
    else:
        lines.append("no kept samples to show")
    return "\n".join(lines)
