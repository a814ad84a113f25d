"""``tokenskip show``: a committed run's summary and a few examples, readable in a terminal.

For each example: the question, the original CoT, and its version at every ratio with the words that
pruning dropped marked ``[-like this-]``, so what compression did is visible without writing
pyarrow code. Rows are streamed (:func:`tokenskip.storage.iter_batches`): showing the first examples
of a huge run reads its first part only.
"""

from __future__ import annotations

import textwrap
from typing import Any

from tokenskip.storage import StorageConfig, iter_batches, read_manifest

DROPPED = "[-{}-]"


def mark_dropped(original: str, kept: str) -> str:
    """``original``'s words with those missing from ``kept`` marked. Pruning keeps words in order, so
    a left-to-right match of whitespace-separated words finds what was dropped."""
    kept_words = kept.split()
    out, j = [], 0
    for word in original.split():
        if j < len(kept_words) and kept_words[j] == word:
            out.append(word)
            j += 1
        else:
            out.append(DROPPED.format(word))
    return " ".join(out)


def _block(label: str, text: str, width: int) -> list[str]:
    body = textwrap.wrap(text, width=width - 4, break_long_words=False, break_on_hyphens=False) or [""]
    return [label] + ["    " + line for line in body]


def render_examples(rows: list[dict[str, Any]], width: int = 100) -> list[str]:
    lines: list[str] = []
    for n, row in enumerate(rows, 1):
        lines.append(f"--- example {n}/{len(rows)}  key {row['key']}  problem {row['problem_id']}")
        lines += _block(f"question (gold answer {row.get('answer')}):", row.get("question") or "", width)
        lines += _block(f"original CoT ({row.get('original_tokens')} tokens):", row.get("cot") or "", width)
        reasoning, tail = row.get("reasoning") or "", row.get("answer_tail") or ""
        for c in row.get("compressions") or []:
            pruned = (
                c["text"][: len(c["text"]) - len(tail)] if tail and c["text"].endswith(tail) else c["text"]
            )
            label = (
                f"ratio {c['target_ratio']:g} (achieved {c['achieved_ratio']:.2f}, {c['tokens']} tokens; "
                f"dropped words {DROPPED.format('marked')}):"
            )
            lines += _block(label, f"{mark_dropped(reasoning, pruned)} {tail}".strip(), width)
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
            f"  rejects by reason {counts.get('rejects_by_reason')}; errors by reason {counts.get('errors_by_reason')}",
            f"  achieved ratio by target {counts.get('achieved_ratio')}",
        ]
    rows: list[dict[str, Any]] = []
    if examples > 0:
        for batch in iter_batches(config, dataset, "data", manifest.run_id, batch_size=examples):
            rows += batch.to_pylist()[: examples - len(rows)]
            if len(rows) >= examples:
                break
    if rows:
        lines += render_examples(rows, width)
    else:
        lines.append("no kept samples to show")
    return "\n".join(lines)
