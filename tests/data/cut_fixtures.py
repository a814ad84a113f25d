"""Cut the test fixtures in this folder from the reference data sets (../shared/data, see README.md).

Run from the repository root with the reference data beside the checkout:
``python tests/data/cut_fixtures.py [--shared ../shared]``. Every file is written gzipped (``gzip -9n``:
no name or time stamp, so a re-cut is byte-identical) and every row is copied verbatim, in file order:
a cut only leaves rows out. The tests read the files from here and never look at ../shared.
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

# Rows of a CoT file kept for tests/test_grading.py's answer-tail round trip, besides those the other
# tests pick: every STRIDE-th row, so long CoTs (cut off mid-thought ones included) are covered too.
STRIDE = 10
# tests/test_scoring_llmlingua2.py's parity CoTs: the first PARITY_COUNT under a length cap per set.
PARITY_COUNT = 110
PARITY_CAPS = {"gsm8k": 1500, "math500": 3000}
# tests/test_selfinfo.py reads the first SELFINFO_COUNT GSM8K CoTs.
SELFINFO_COUNT = 12
# tests/test_compress.py: the COMPRESS_COUNT shortest CoTs per set that state a final answer.
COMPRESS_COUNT = 4
# tests/test_dedup.py's flag-rate check reads the first GSM8K_TRAIN_HEAD train problems.
GSM8K_TRAIN_HEAD = 500


def write_gz(path: Path, lines: list[str]) -> None:
    """Lines as they were in the source (each with its own line ending, the last one maybe without)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with (
        open(path, "wb") as raw,
        gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0, filename="") as gz,
    ):
        gz.write("".join(lines).encode("utf-8"))
    print(f"{path.relative_to(HERE)}: {len(lines)} rows, {path.stat().st_size:,} bytes")


def source_lines(path: Path) -> list[str]:
    """The file's lines, split at "\\n" only (str.splitlines also splits at U+2028, which GSM8K has)."""
    text = path.read_text(encoding="utf-8")
    return [line for line in re.findall(r"[^\n]*\n|[^\n]+$", text) if line.strip()]


def cot_rows(name: str, lines: list[str]) -> list[int]:
    """Indices of the CoT rows the tests read (see the constants above)."""
    from tokenskip.grading import split_answer_tail

    rows = [json.loads(line) for line in lines]
    keep = set(range(0, len(rows), STRIDE))
    parity = [i for i, r in enumerate(rows) if len(r["response"]) <= PARITY_CAPS[name]][:PARITY_COUNT]
    # Every row up to the last parity row that passes the cap is a parity row, so the test's filter
    # picks the same 110 from the cut file.
    keep.update(parity)
    with_tail = [i for i, r in enumerate(rows) if split_answer_tail(r["response"])[1]]
    keep.update(sorted(with_tail, key=lambda i: len(rows[i]["response"]))[:COMPRESS_COUNT])
    if name == "gsm8k":
        keep.update(range(SELFINFO_COUNT))
    return sorted(keep)


def flagged_train_rows(shared: Path, train_lines: list[str]) -> list[int]:
    """The GSM8K train problems the decontaminator flags against GSM8K test + MATH-500 + AIME."""
    from tokenskip.dedup import DedupConfig, dedup_and_decontaminate
    from tokenskip.sources import SourceConfig, load_problems

    data = shared / "data"
    config = DedupConfig(
        eval_sets=[
            SourceConfig(path=str(data / "gsm8k/test.jsonl"), kind="gsm8k", split="test"),
            SourceConfig(path=str(data / "math500/test.jsonl"), kind="math", split="test"),
            SourceConfig(path=str(data / "aime/aime_1983_2023.jsonl"), kind="aime", split="test"),
        ]
    )
    train, _ = load_problems(SourceConfig(path=str(data / "gsm8k/train.jsonl"), kind="gsm8k"))
    assert train.num_rows == len(train_lines)
    _, rejects = dedup_and_decontaminate(train, config)
    flagged = set(rejects["problem_id"].to_pylist())
    return [i for i, pid in enumerate(train["id"].to_pylist()) if pid in flagged]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", type=Path, default=HERE.parents[2] / "shared")
    args = parser.parse_args()
    data = args.shared / "data"

    for rel in ("gsm8k/test.jsonl", "math500/test.jsonl", "aime/aime_1983_2023.jsonl"):
        write_gz(HERE / f"{rel}.gz", source_lines(data / rel))  # whole sets: the tests count every row

    train = source_lines(data / "gsm8k/train.jsonl")
    flagged = flagged_train_rows(args.shared, train)
    print(f"gsm8k train rows flagged as contaminated: {flagged}")
    keep = sorted(set(range(GSM8K_TRAIN_HEAD)) | set(flagged))
    write_gz(HERE / "gsm8k/train.jsonl.gz", [train[i] for i in keep])

    for name in ("gsm8k", "math500"):
        lines = source_lines(data / f"cot_samples/r1_distill_7b_{name}_test.jsonl")
        write_gz(
            HERE / f"cot_samples/r1_distill_7b_{name}_test.jsonl.gz",
            [lines[i] for i in cot_rows(name, lines)],
        )
    # Every GSM8K row's problem and original-layout gold ("solution #### N"), without the response:
    # tests/test_sources.py loads the whole set in the original GSM8K layout.
    lines = source_lines(data / "cot_samples/r1_distill_7b_gsm8k_test.jsonl")
    golds = []
    for line in lines:
        row = json.loads(line)
        golds.append(json.dumps({k: row[k] for k in ("id", "problem", "gold_answer")}) + "\n")
    write_gz(HERE / "cot_samples/r1_distill_7b_gsm8k_test.golds.jsonl.gz", golds)

    crds = HERE / "kuberay-crds"
    for path in sorted((args.shared / "kuberay-crds").glob("ray.io_*.yaml")):
        write_gz(crds / f"{path.name}.gz", source_lines(path))
    for name in ("SHA256SUMS", "VERSION.md"):
        shutil.copyfile(args.shared / "kuberay-crds" / name, crds / name)


if __name__ == "__main__":
    main()
