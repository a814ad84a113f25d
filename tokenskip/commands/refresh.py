"""``tokenskip refresh``: publish a dataset's next version from a refresh YAML, generating only the
problems LATEST does not have (tokenskip/refresh.py); a scheduler runs it as
``python -m ray_jobs.refresh``. Up to date, or its budget reached (the next refresh resumes), is a
success; a refresh held back, locked or on an incompatible base says why in one line and exits with
its own code (tokenskip --help lists them).
"""

from __future__ import annotations

import argparse
import json
import sys

from tokenskip.config import add_config_arguments
from tokenskip.exit_codes import ExitCode


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        config_help="refresh YAML (see tokenskip/configs/refresh_example.yaml)",
        dry_run_help="print what the refresh would do and exit",
    )


def run_command(args: argparse.Namespace) -> int:
    from tokenskip.config import parse_overrides
    from tokenskip.console import place_log
    from tokenskip.pipeline import RunStopped
    from tokenskip.refresh import IncompatibleBase, load_refresh_config, plan_refresh, refresh
    from tokenskip.storage import LockHeld, RunStore

    def log_with_the_version(plan) -> None:
        # The log goes into the version's folder (a local one; else it stays where it is printed). A
        # refresh with nothing to do writes no version, and its log is dropped when it ends.
        if not plan.up_to_date:
            version = RunStore(plan.pipeline.output, plan.pipeline.dataset, plan.version)
            place_log(args.run_log, version.local_dir())

    config = load_refresh_config(args.config, parse_overrides(args.set))
    # A held lock or a changed config is a refresh's expected "not now": said as the refresh's own
    # line, not as an error. Missing capacity and user errors are the CLI's, as for every command.
    try:
        if args.dry_run:
            print(plan_refresh(config).describe())
            return ExitCode.OK
        result = refresh(config, on_plan=log_with_the_version)
    except LockHeld as exc:
        print(f"refresh refused: {exc}", file=sys.stderr)
        return ExitCode.LOCKED
    except IncompatibleBase as exc:
        print(f"refresh refused: {exc}", file=sys.stderr)
        return ExitCode.INCOMPATIBLE_BASE
    except RunStopped as stopped:
        print(
            f"refresh stopped by {stopped.signal_name}: committed shards kept; the next refresh resumes",
            file=sys.stderr,
        )
        return ExitCode.STOPPED
    result.pop("pipeline", None)  # the full run report is in runs/<version>/report.json
    print(json.dumps(result, indent=2, default=str))
    if result.get("status") == "refused":
        print(
            f"refresh refused: version {result['version']} not published: {result['reason']}", file=sys.stderr
        )
        return ExitCode.REFUSED
    return ExitCode.OK
