"""Ray job: incremental refresh of a dataset (one new version with only the new problems generated).

    ray job submit --working-dir . -- python -m ray_jobs.refresh --config refresh.yaml

Exit codes: 0 published / up to date / budget reached (resumes next time); 3 another refresh holds
the dataset's lock (nothing was done; the scheduler can simply try again later); 4 LATEST was built
with another config (see ``rebuild_on_config_change``); 5 the new version was held back (empty, or it
lost more kept samples than ``min_kept_fraction`` allows; the reason is printed, LATEST unchanged);
6 stopped by SIGTERM/SIGINT (committed shards kept, lock released; the next refresh resumes); 7 the
cluster cannot place the pools' minimum (``resources.capacity_wait_s``); 1 any other error (LATEST
unchanged).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tokenskip.config import add_config_arguments

EXIT_LOCKED = 3
EXIT_INCOMPATIBLE = 4
EXIT_REFUSED = 5
EXIT_STOPPED = 6
EXIT_NO_CAPACITY = 7


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    parser = argparse.ArgumentParser(prog="python -m ray_jobs.refresh", description=__doc__.splitlines()[0])
    add_config_arguments(
        parser,
        config_help="refresh YAML (see tokenskip/configs/refresh_example.yaml)",
        dry_run_help="print what the refresh would do and exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="stream every log line to the console")
    args = parser.parse_args(argv)
    from tokenskip.console import console_logging

    with console_logging("refresh", verbose=args.verbose) as run_log:
        return _refresh(args, run_log)


def _refresh(args: argparse.Namespace, run_log) -> int:
    from tokenskip.capacity import CapacityUnavailable
    from tokenskip.config import parse_overrides
    from tokenskip.console import place_log
    from tokenskip.pipeline import RunStopped
    from tokenskip.refresh import IncompatibleBase, LockHeld, load_refresh_config, plan_refresh, refresh
    from tokenskip.storage import RunStore

    def log_with_the_version(plan) -> None:
        # The log goes into the version's folder (a local one; else it stays where it is printed). A
        # refresh with nothing to do writes no version, and its log is dropped when it ends.
        if not plan.up_to_date:
            version = RunStore(plan.pipeline.output, plan.pipeline.dataset, plan.version)
            place_log(run_log, version.local_dir())

    config = load_refresh_config(args.config, parse_overrides(args.set))
    try:
        if args.dry_run:
            print(plan_refresh(config).describe())
            return 0
        result = refresh(config, on_plan=log_with_the_version)
    except LockHeld as exc:
        print(f"refresh refused: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except IncompatibleBase as exc:
        print(f"refresh refused: {exc}", file=sys.stderr)
        return EXIT_INCOMPATIBLE
    except RunStopped as stopped:
        print(f"refresh stopped by {stopped.signal_name}: committed shards kept; the next refresh resumes", file=sys.stderr)
        return EXIT_STOPPED
    except CapacityUnavailable as exc:
        print(f"refresh failed: {exc}", file=sys.stderr)
        return EXIT_NO_CAPACITY
    result.pop("pipeline", None)  # the full run report is in runs/<version>/report.json
    print(json.dumps(result, indent=2, default=str))
    if result.get("status") == "refused":
        print(
            f"refresh refused: version {result['version']} not published: {result['reason']}", file=sys.stderr
        )
        return EXIT_REFUSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
