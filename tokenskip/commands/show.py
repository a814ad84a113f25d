"""``tokenskip show``: a committed run's summary and a few kept samples: the question, the original
CoT and each ratio's compression, with the words pruning dropped marked."""

from __future__ import annotations

import argparse

from tokenskip.commands import json_object, positive_int


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True, help="output root: a local folder or s3://bucket/prefix")
    parser.add_argument("--dataset", required=True, help="dataset name (a folder below the root)")
    parser.add_argument("--run-id", default=None, help="the run to show (default: the run LATEST points to)")
    parser.add_argument("-k", "--examples", type=int, default=3, help="kept samples to show (default: 3)")
    parser.add_argument("--width", type=positive_int, default=100, help="text width (default: 100)")
    parser.add_argument(
        "--storage-options", default="{}", type=json_object, help="fsspec options as a JSON object"
    )


def run_command(args: argparse.Namespace) -> int:
    from tokenskip import storage
    from tokenskip.show import show_run

    config = storage.StorageConfig(root=args.root, storage_options=args.storage_options)
    storage.require_dataset(config, args.dataset)
    print(show_run(config, args.dataset, args.run_id, examples=args.examples, width=args.width))
    return 0
