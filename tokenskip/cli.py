"""``tokenskip`` command line: run, refresh, compress, storage, show, train, evaluate, export, export-model."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import yaml

from tokenskip.commands import one_line
from tokenskip.exit_codes import ExitCode, exit_code_table


@dataclass(frozen=True)
class Command:
    """A subcommand: ``module``'s docstring is its description, ``module.add_arguments(parser)`` its
    options, ``module.run_command(args)`` its work and exit code (see :mod:`tokenskip.commands`).
    Every command is registered this one way; the ``ray_jobs`` entrypoints call them through
    :func:`main`."""

    name: str
    module: str
    help: str


COMMANDS = (
    Command("run", "tokenskip.commands.run", "build a compressed CoT dataset (the Ray Data pipeline)"),
    Command(
        "refresh",
        "tokenskip.commands.refresh",
        "publish a dataset's next version, generating only the new problems (scheduled refresh)",
    ),
    Command("compress", "tokenskip.commands.compress", "prune CoTs from a jsonl/parquet file at every ratio"),
    Command("storage", "tokenskip.commands.storage", "inspect runs, roll LATEST back, pin runs"),
    Command(
        "show",
        "tokenskip.commands.show",
        "a committed run's summary and examples: question, original CoT, each ratio (dropped words marked)",
    ),
    Command("train", "tokenskip.train.job", "Fine-tune on TokenSkip / TL;DR data with Ray Train (LoRA or full)."),
    Command(
        "evaluate", "tokenskip.evaluate", "accuracy and CoT tokens per compression ratio (TokenSkip's table)"
    ),
    Command(
        "export", "tokenskip.export", "a committed dataset's SFT mix as LLaMA-Factory alpaca JSON or chat JSONL"
    ),
    Command(
        "export-model",
        "tokenskip.train.export",
        "a kept training checkpoint (ddp or fsdp, full or LoRA) as a Hugging Face model folder",
    ),
)


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenskip",
        description=__doc__,
        epilog=f"exit codes (README.md, section Exit codes, says more):\n{exit_code_table()}",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # the table's lines as they are
    )
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

    # A subcommand whose module fails to import fails the whole CLI with that error: skipping it
    # would silently remove a command (and hide a broken install).
    for command in COMMANDS:
        module = importlib.import_module(command.module)
        parser_of = sub.add_parser(
            command.name, parents=[verbose], help=command.help, description=module.__doc__
        )
        module.add_arguments(parser_of)
        parser_of.set_defaults(func=module.run_command)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the request was wrong, not the program: one line and exit 2."""
    import pydantic

    from tokenskip.config import OverrideError
    from tokenskip.errors import UserError

    return (
        UserError,
        OverrideError,  # a --set that does not fit the config
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
            f"S3 credentials: {one_line(exc)} (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or "
            "AWS_PROFILE, or the path's storage_options; or use local paths)"
        )
    return one_line(exc)


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
    (``verbose`` adds the traceback; :mod:`tokenskip.exit_codes`). Every command runs through it."""
    from tokenskip.capacity import CapacityUnavailable
    from tokenskip.storage import LockHeld

    try:
        return work()
    except KeyboardInterrupt:
        # Ctrl-C outside a run's commit loop (planning, a command without a graceful stop).
        if verbose:
            traceback.print_exc()
        resumes = "; a re-run resumes from what was committed" if command in ("run", "refresh", "train") else ""
        print(f"tokenskip {command}: interrupted{resumes}", file=sys.stderr)
        return ExitCode.STOPPED
    except CapacityUnavailable as exc:
        if verbose:
            traceback.print_exc()
        print(f"tokenskip {command}: error: {exc}", file=sys.stderr)
        return ExitCode.NO_CAPACITY
    except LockHeld as exc:
        if verbose:
            traceback.print_exc()
        print(f"tokenskip {command}: refused: {exc}", file=sys.stderr)
        return ExitCode.LOCKED
    except _user_errors() as exc:
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (--verbose shows the traceback)"
        print(f"tokenskip {command}: error: {user_error_line(exc)}{hint}", file=sys.stderr)
        return ExitCode.USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
