"""``tokenskip storage``: inspect a dataset's committed runs, point LATEST at one, pin runs.

``runs`` lists the committed runs (oldest first, with row counts; LATEST and pinned runs marked);
``set-latest`` rolls LATEST to a committed run; ``pin``/``unpin`` protect a run from retention.
"""

from __future__ import annotations

import argparse

from tokenskip.commands import json_object


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "storage_cmd",
        choices=["runs", "set-latest", "pin", "unpin"],
        help="runs: list committed runs (LATEST and pins marked); set-latest: point LATEST at a committed "
        "run; pin/unpin: protect a run from retention or stop protecting it",
    )
    parser.add_argument("--root", required=True, help="output root: a local folder or s3://bucket/prefix")
    parser.add_argument("--dataset", required=True, help="dataset name (a folder below the root)")
    parser.add_argument("--run-id", help="the run to act on (set-latest, pin, unpin)")
    parser.add_argument(
        "--storage-options", default="{}", type=json_object, help="fsspec options as a JSON object"
    )


def run_command(args: argparse.Namespace) -> int:
    from tokenskip import storage
    from tokenskip.preflight import UserError

    config = storage.StorageConfig(root=args.root, storage_options=args.storage_options)
    if args.storage_cmd in ("set-latest", "pin", "unpin") and not args.run_id:
        raise UserError(f"--run-id is required for {args.storage_cmd}")
    storage.require_dataset(config, args.dataset)
    if args.storage_cmd == "set-latest":
        storage.set_latest(config, args.dataset, args.run_id)
        print(f"LATEST of {args.dataset} -> {args.run_id}")
    elif args.storage_cmd == "runs":
        print(_runs_table(config, args.dataset))
    elif args.storage_cmd == "pin":
        storage.pin(config, args.dataset, args.run_id)
        print(f"pinned {args.run_id} of {args.dataset}: retention keeps it")
    elif args.storage_cmd == "unpin":
        if args.run_id not in storage.pinned_runs(config, args.dataset):
            raise UserError(f"run {args.run_id!r} of {args.dataset!r} is not pinned")
        storage.unpin(config, args.dataset, args.run_id)
        print(f"unpinned {args.run_id} of {args.dataset}")
    return 0


def _runs_table(config, dataset: str) -> str:
    """Committed runs, oldest first, with row counts and marks for LATEST and pinned runs."""
    from tokenskip import storage

    try:
        latest = storage.latest_run_id(config, dataset)
    except storage.NotCommitted:
        latest = None
    pinned = storage.pinned_runs(config, dataset)
    rows = [("RUN", "COMMITTED (UTC)", "DATA", "REJECTS", "ERRORS", "")]
    for m in storage.list_committed_runs(config, dataset):
        marks = " ".join(
            mark for mark, on in (("LATEST", m.run_id == latest), ("pinned", m.run_id in pinned)) if on
        )
        rows.append(
            (
                m.run_id,
                m.created_at[:19].replace("T", " "),
                *(str(m.rows.get(kind, 0)) for kind in ("data", "rejects", "errors")),
                marks,
            )
        )
    if len(rows) == 1:
        return f"no committed runs in {dataset}"
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows)
