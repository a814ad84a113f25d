"""``tokenskip compress``: prune the CoTs of a jsonl/parquet file at every ratio, without the pipeline.

One scorer pass per CoT serves every ratio (tokenskip/compress.py); rows that fail go beside the
output as ``<name>.errors.parquet``, and a JSON summary goes to stdout.
"""

from __future__ import annotations

import argparse
import json

from tokenskip.commands import add_skip_model_check


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", required=True, help="jsonl or parquet file of CoTs (local or s3://...)")
    parser.add_argument(
        "--output", required=True, help="output parquet path (errors go beside it, <name>.errors.parquet)"
    )
    parser.add_argument(
        "--ratios",
        default="0.9,0.8,0.7,0.6,0.5",
        help="target ratios, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--scorer", choices=["llmlingua2", "selfinfo"], default="llmlingua2")
    parser.add_argument("--model", default=None, help="scorer model (HF id or path)")
    parser.add_argument(
        "--target-tokenizer", default=None, help="tokenizer that counts tokens (default: --model)"
    )
    parser.add_argument(
        "--cot-field", default="cot", help="input column holding the CoT (cot_samples: response)"
    )
    add_skip_model_check(parser)


def run_command(args: argparse.Namespace) -> int:
    from tokenskip.compress import CompressConfig, compress_file
    from tokenskip.console import place_log
    from tokenskip.models import model_problem
    from tokenskip.preflight import UserError
    from tokenskip.scoring import ScorerConfig

    try:
        ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    except ValueError:
        raise UserError(f"--ratios expects comma-separated numbers, got {args.ratios!r}") from None
    scorer = (
        ScorerConfig(kind=args.scorer, model=args.model) if args.model else ScorerConfig(kind=args.scorer)
    )
    target = args.target_tokenizer or scorer.model
    models = set() if args.skip_model_check else {scorer.model, target}
    problems = [p for m in sorted(models) if (p := model_problem(m)) is not None]
    if problems:
        raise UserError("; ".join(problems))
    config = CompressConfig(ratios=ratios, scorer=scorer, target_tokenizer=target)
    place_log(args.run_log, _parent(args.output))
    summary = compress_file(args.input, args.output, config, cot_column=args.cot_field)
    print(json.dumps(summary, indent=2, default=str))
    return 0


def _parent(path: str) -> str:
    """The folder holding ``path`` (a local path or URL)."""
    return path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
