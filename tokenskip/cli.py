"""``tokenskip`` command line: run (build a dataset), compress, show, train, evaluate, export, storage."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable

import yaml

from tokenskip.config import add_config_arguments

EXIT_REFUSED = 1  # the run finished but was not published (empty); the reason is printed
EXIT_USER_ERROR = 2  # bad config, missing input, unwritable output, unknown model: nothing was started
EXIT_LOCKED = 3  # another writer holds the run's lease (or the refresh lock): try again later
# 4 and 5 are refresh's (an incompatible base, a refresh held back).
EXIT_STOPPED = 6  # SIGTERM/SIGINT: committed shards kept, lease released, report written; re-run resumes
EXIT_NO_CAPACITY = 7  # the cluster cannot place the pools' minimum (resources.capacity_wait_s); re-run resumes
# Commands that live in their own module (which also serves a Ray job entrypoint): (name, module,
# help). The module documents the command in its docstring and has add_arguments(parser) and
# run_command(args) -> exit code.
MODULE_COMMANDS = (
    ("train", "tokenskip.train.job", "Fine-tune on TokenSkip / TL;DR data with Ray Train (LoRA or full)."),
    ("evaluate", "tokenskip.evaluate", "accuracy and CoT tokens per compression ratio (TokenSkip's table)"),
    ("export", "tokenskip.export", "a committed dataset's SFT mix as LLaMA-Factory alpaca JSON or chat JSONL"),
)


def cmd_run(args: argparse.Namespace) -> int:
    from tokenskip.config import load_pipeline_config, parse_overrides
    from tokenskip.pipeline import RunRefused, RunStopped, build_dry_run_graph, make_plan, run_pipeline
    from tokenskip.preflight import UserError, check_run
    from tokenskip.storage import RunStore

    try:
        config = load_pipeline_config(args.config, parse_overrides(args.set))
    except ValueError as exc:  # pydantic's ValidationError and --set's OverrideError too
        raise UserError(f"config {args.config}: {_one_line(exc)}") from exc
    check_run(config, check_models=not args.skip_model_check)  # output root, models: before any engine starts
    plan = make_plan(config)
    print(plan.describe(), flush=True)
    if args.dry_run:
        build_dry_run_graph(plan)  # the run's Ray Data graph, built and not run: it fails where the run would
        return 0
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
        return EXIT_REFUSED
    except RunStopped as stopped:
        pending = stopped.report.get("pending_shards", 0)
        print(
            f"tokenskip run: stopped by {stopped.signal_name}: run {plan.run_id} has "
            f"{len(plan.shards) - pending} of {len(plan.shards)} shards committed, its lease is released "
            "and report.txt says what is committed; re-run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_STOPPED
    finally:
        if run_log is not None and store.local_dir() is None:
            _upload_log(store, run_log)
    print(_run_outcome(report))
    if report.get("committed"):
        print(_where_the_data_is(config, store))
    return 0


def _run_outcome(report: dict) -> str:
    """What the run did, for a person (the whole report is report.json in the run's folder)."""
    from tokenskip.pipeline import _summary_text

    if "attempt" not in report:  # the config's run was committed before: nothing was generated
        counts = report.get("counts") or {}
        return (
            f"run {report['run_id']} of {report['dataset']} is already committed: nothing to do "
            f"(kept {counts.get('kept_samples', 0)} samples from {counts.get('kept_problems', 0)} problems; "
            "its report.json has the figures)"
        )
    text = _summary_text(report)
    if not report.get("committed"):
        text += (
            f"\nrun {report['run_id']} not committed yet: {report.get('pending_shards', 0)} shards still to do "
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
            "could not copy the log %s to the run folder: %s", run_log.path, _one_line(exc)
        )


def cmd_compress(args: argparse.Namespace) -> int:
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


def cmd_storage(args: argparse.Namespace) -> int:
    from tokenskip import storage
    from tokenskip.preflight import UserError

    config = storage.StorageConfig(root=args.root, storage_options=json.loads(args.storage_options or "{}"))
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


def cmd_show(args: argparse.Namespace) -> int:
    from tokenskip import storage
    from tokenskip.show import show_run

    config = storage.StorageConfig(root=args.root, storage_options=json.loads(args.storage_options or "{}"))
    storage.require_dataset(config, args.dataset)
    print(show_run(config, args.dataset, args.run_id, examples=args.examples, width=args.width))
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


class _VersionAction(argparse.Action):
    """``--version``, computed only when asked (it may call git)."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from tokenskip.storage import code_version

        version = code_version()
        sha = f" (git {version.git_sha[:12]})" if version.git_sha else ""
        print(f"tokenskip {version.package_version or 'unknown'}{sha}")
        parser.exit()


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _add_skip_model_check(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--skip-model-check",
        action="store_true",
        help="start without checking that the models resolve (a local folder, the local Hugging Face "
        "cache or the hub); by default a model that cannot be resolved is an error before any engine starts",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenskip", description=__doc__)
    parser.add_argument(
        "--version", action=_VersionAction, help="print the version (and git commit) and exit"
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; tracebacks with error messages"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    # -v after the subcommand too (tokenskip run -v ...); SUPPRESS keeps the top-level value otherwise.
    verbose = argparse.ArgumentParser(add_help=False)
    verbose.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        default=argparse.SUPPRESS,
        help="debug logging; tracebacks with error messages",
    )

    run = sub.add_parser(
        "run", parents=[verbose], help="build a compressed CoT dataset (the Ray Data pipeline)"
    )
    add_config_arguments(
        run,
        config_help="pipeline YAML (see tokenskip/configs/)",
        dry_run_help="print the plan (stages, resources, row counts) and exit",
    )
    run.add_argument(
        "--max-shards", type=_positive_int, default=None, help="commit at most N new shards, then stop"
    )
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_skip_model_check(run)
    run.set_defaults(func=cmd_run)

    comp = sub.add_parser(
        "compress", parents=[verbose], help="prune CoTs from a jsonl/parquet file at every ratio"
    )
    comp.add_argument("--input", required=True, help="jsonl or parquet file of CoTs (local or s3://...)")
    comp.add_argument(
        "--output", required=True, help="output parquet path (errors go beside it, <name>.errors.parquet)"
    )
    comp.add_argument(
        "--ratios",
        default="0.9,0.8,0.7,0.6,0.5",
        help="target ratios, comma-separated (default: %(default)s)",
    )
    comp.add_argument("--scorer", choices=["llmlingua2", "selfinfo"], default="llmlingua2")
    comp.add_argument("--model", default=None, help="scorer model (HF id or path)")
    comp.add_argument(
        "--target-tokenizer", default=None, help="tokenizer that counts tokens (default: --model)"
    )
    comp.add_argument(
        "--cot-field", default="cot", help="input column holding the CoT (cot_samples: response)"
    )
    _add_skip_model_check(comp)
    comp.set_defaults(func=cmd_compress)

    st = sub.add_parser("storage", parents=[verbose], help="inspect runs, roll LATEST back, pin runs")
    st.add_argument(
        "storage_cmd",
        choices=["runs", "set-latest", "pin", "unpin"],
        help="runs: list committed runs (LATEST and pins marked); set-latest: point LATEST at a committed "
        "run; pin/unpin: protect a run from retention or stop protecting it",
    )
    st.add_argument("--root", required=True, help="output root: a local folder or s3://bucket/prefix")
    st.add_argument("--dataset", required=True, help="dataset name (a folder below the root)")
    st.add_argument("--run-id", help="the run to act on (set-latest, pin, unpin)")
    st.add_argument("--storage-options", default=None, help="fsspec options as JSON")
    st.set_defaults(func=cmd_storage)

    show = sub.add_parser(
        "show",
        parents=[verbose],
        help="a committed run's summary and examples: question, original CoT, each ratio (dropped words marked)",
    )
    show.add_argument("--root", required=True, help="output root: a local folder or s3://bucket/prefix")
    show.add_argument("--dataset", required=True, help="dataset name (a folder below the root)")
    show.add_argument("--run-id", default=None, help="the run to show (default: the run LATEST points to)")
    show.add_argument("-k", "--examples", type=int, default=3, help="kept samples to show (default: 3)")
    show.add_argument("--width", type=_positive_int, default=100, help="text width (default: 100)")
    show.add_argument("--storage-options", default=None, help="fsspec options as JSON")
    show.set_defaults(func=cmd_show)

    # A subcommand whose module fails to import fails the whole CLI with that error: skipping it
    # would silently remove a command (and hide a broken install).
    for name, module_name, help_text in MODULE_COMMANDS:
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(command)
        command.set_defaults(func=module.run_command)
    return parser


def _one_line(exc: BaseException) -> str:
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


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the request was wrong, not the program: one line and exit 2."""
    import pydantic

    from tokenskip.errors import UserError

    return (
        UserError,
        pydantic.ValidationError,
        yaml.YAMLError,
        FileNotFoundError,  # missing config, input, dataset or run (storage.NotFound, NotCommitted)
        PermissionError,
        IsADirectoryError,
        NotADirectoryError,
        *_credential_errors(),
    )


def _credential_errors() -> tuple[type[BaseException], ...]:
    """botocore's "no credentials" errors: an s3:// path in the config with no credentials around
    (a placeholder bucket, a shell without AWS_PROFILE). They reach us from s3fs unwrapped."""
    try:
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError
    except ImportError:  # no S3 support installed: nothing of it can be raised
        return ()
    return (NoCredentialsError, PartialCredentialsError)


def user_error_line(exc: BaseException) -> str:
    """A user error as the one line the CLI prints after ``tokenskip <command>: error:``."""
    if isinstance(exc, _credential_errors()):
        return (
            f"S3 credentials: {_one_line(exc)} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or the path's storage_options; or use local paths)"
        )
    return _one_line(exc)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    args = build_parser().parse_args(argv)
    from tokenskip.console import console_logging

    # Each command moves its log to where its output goes and prints the path (console.place_log).
    with console_logging(args.command, verbose=args.verbose) as run_log:
        args.run_log = run_log
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    return run_reporting_errors(args.command, lambda: args.func(args), verbose=args.verbose)


def run_reporting_errors(command: str, work: Callable[[], int], *, verbose: bool = False) -> int:
    """``work()``'s exit code; a user error (:func:`_user_errors`) is one line on stderr and exit 2,
    a held lease exit 3, an interrupt outside a run's commit loop exit 6, missing capacity exit 7
    (``verbose`` adds the traceback). The CLI and the job entrypoints use it."""
    from tokenskip.capacity import CapacityUnavailable
    from tokenskip.storage import LockHeld

    try:
        return work()
    except KeyboardInterrupt:
        # Ctrl-C outside a run's commit loop (planning, a command without a graceful stop).
        if verbose:
            traceback.print_exc()
        resumes = "; a re-run resumes from what was committed" if command in ("run", "train") else ""
        print(f"tokenskip {command}: interrupted{resumes}", file=sys.stderr)
        return EXIT_STOPPED
    except CapacityUnavailable as exc:
        if verbose:
            traceback.print_exc()
        print(f"tokenskip {command}: error: {exc}", file=sys.stderr)
        return EXIT_NO_CAPACITY
    except LockHeld as exc:
        if verbose:
            traceback.print_exc()
        print(f"tokenskip {command}: refused: {exc}", file=sys.stderr)
        return EXIT_LOCKED
    except _user_errors() as exc:
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (--verbose shows the traceback)"
        print(f"tokenskip {command}: error: {user_error_line(exc)}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
