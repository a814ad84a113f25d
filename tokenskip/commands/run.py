"""``tokenskip run``: build a compressed CoT dataset (the Ray Data pipeline) from a pipeline YAML.

It checks the config, the output root and the models before any engine starts, prints the plan,
then generates, grades and compresses one shard of problems at a time, committing each; a re-run of
the same config resumes. The end of its console says where the data is and how to read it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import TYPE_CHECKING

from tokenskip.commands import add_skip_model_check, one_line, positive_int
from tokenskip.config import add_config_arguments
from tokenskip.exit_codes import ExitCode

if TYPE_CHECKING:
    from tokenskip.run_report import RunReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(
        parser,
        config_help="pipeline YAML (see tokenskip/configs/)",
        dry_run_help="print the plan (stages, resources, row counts) and exit",
    )
    parser.add_argument(
        "--max-shards", type=positive_int, default=None, help="commit at most N new shards, then stop"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_skip_model_check(parser)


def run_command(args: argparse.Namespace) -> int:
    from tokenskip.config import load_pipeline_config, parse_overrides
    from tokenskip.pipeline import RunRefused, RunStopped, build_dry_run_graph, make_plan, run_pipeline
    from tokenskip.preflight import UserError, check_run
    from tokenskip.storage import RunStore

    try:
        config = load_pipeline_config(args.config, parse_overrides(args.set))
    except ValueError as exc:  # pydantic's ValidationError and --set's OverrideError too
        raise UserError(f"config {args.config}: {one_line(exc)}") from exc
    check_run(config, check_models=not args.skip_model_check)  # output root, models: before any engine starts
    plan = make_plan(config)
    print(plan.describe(), flush=True)
    if args.dry_run:
        build_dry_run_graph(plan)  # the run's Ray Data graph, built and not run: it fails where the run would
        return ExitCode.OK
    store = RunStore(config.output, config.dataset, plan.run_id)
    run_log = args.run_log
    if run_log is not None and not plan.already_committed_run:
        log_dir = store.local_log_dir()
        if log_dir is not None:  # the log lives with the run; a remote run gets a copy at the end
            run_log.move_to(log_dir)
        print(f"log: {run_log.announce()} (engine and Ray output; --verbose shows it here)", flush=True)
    try:
        report = run_pipeline(config, max_shards=args.max_shards, plan=plan, progress=not args.no_progress)
    except RunRefused as refused:
        print(
            f"tokenskip run: run {plan.run_id} not published, LATEST unchanged: {refused.reason} "
            "(output.allow_empty=true publishes such a run)",
            file=sys.stderr,
        )
        return ExitCode.REFUSED
    except RunStopped as stopped:
        pending = stopped.report.pending_shards or 0
        print(
            f"tokenskip run: stopped by {stopped.signal_name}: run {plan.run_id} has "
            f"{len(plan.shards) - pending} of {len(plan.shards)} shards committed, its lease is released "
            "and report.txt says what is committed; re-run the same command to resume",
            file=sys.stderr,
        )
        return ExitCode.STOPPED
    finally:
        if run_log is not None and store.local_dir() is None:
            _upload_log(store, run_log)
    print(_run_outcome(report))
    if report.committed:
        print(_where_the_data_is(config, store))
    return ExitCode.OK


def _run_outcome(report: RunReport) -> str:
    """What the run did, for a person (the whole report is report.json in the run's folder)."""
    if report.attempt is None:  # the config's run was committed before: nothing was generated
        return (
            f"run {report.run_id} of {report.dataset} is already committed: nothing to do "
            f"(kept {report.counts.kept_samples} samples from {report.counts.kept_problems} problems; "
            "its report.json has the figures)"
        )
    text = report.summary_text()
    if not report.committed:
        text += (
            f"\nrun {report.run_id} not committed yet: {report.pending_shards or 0} shards still to do "
            "(run the same command again to continue; committed shards are kept)"
        )
    return text


def _where_the_data_is(config, store) -> str:
    """The end of a run's console: the data, three lines of Python to read it, the reports."""
    from tokenskip.dataset_card import loading_snippet, shareable_options

    output = config.output
    snippet = loading_snippet(output.root, config.dataset, store.run_id, output.storage_options)
    show = f"tokenskip show --root {output.root} --dataset {config.dataset}"
    shareable = shareable_options(output.storage_options)
    if shareable:
        show += f" --storage-options '{json.dumps(shareable)}'"
    lines = [
        f"data: {store.run_url} (dataset card: README.md, report: report.html)",
        "read it:",
        *(f"  {line}" for line in snippet),
        f"examples: {show}",
    ]
    return "\n".join(lines)


def _upload_log(store, run_log) -> None:
    """A remote run folder gets the driver's log once the attempt ends (best effort: the local file
    stays where it was printed)."""
    try:
        store.write_log(run_log.name, run_log.text())
    except Exception as exc:  # the run's outcome stands; the log stays where it was printed
        logging.getLogger(__name__).warning(
            "could not copy the log %s to the run folder: %s", run_log.path, one_line(exc)
        )
