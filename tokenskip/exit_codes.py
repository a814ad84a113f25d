"""The exit codes of every ``tokenskip`` command and ``ray_jobs`` entrypoint: one number, one meaning.

A scheduler (a CronJob, ``ray job submit``, a script) acts on them: 3 is "try again later", 5 is
"look at the data", 6 and 7 are "re-run to resume". The README's *Exit codes* section explains each
one; ``tokenskip --help`` prints this table.

1 is Python's own status for an uncaught exception (and the one Ray reports for a failed job), so it
can only mean "failed". A run that finished but was not published therefore shares 5 with a refresh
held back: both leave LATEST unchanged and print the reason, and a caller handles them the same way.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    """A command's outcome; ``summary`` is its line in ``tokenskip --help``."""

    summary: str

    def __new__(cls, value: int, summary: str) -> ExitCode:
        member = int.__new__(cls, value)
        member._value_ = value
        member.summary = summary
        return member

    OK = 0, "done (a run committed, a refresh published or up to date, a dry run)"
    FAILED = 1, "failed (training failed, no checkpoint within the sweep's budget, an unexpected error)"
    USER_ERROR = 2, "a user error (config, --set, input, output, model, credentials): one line, nothing started"
    LOCKED = 3, "another writer holds the run's lease or the refresh lock: nothing done, try again later"
    INCOMPATIBLE_BASE = 4, "refresh: LATEST was built with another config (each differing field named)"
    REFUSED = 5, "finished but not published (empty, or too few kept samples): LATEST unchanged, reason printed"
    STOPPED = 6, "stopped by SIGTERM/SIGINT: committed shards kept, a re-run resumes"
    NO_CAPACITY = 7, "the cluster cannot place the pools' minimum (resources.capacity_wait_s): a re-run resumes"


def exit_code_table() -> str:
    """Every exit code and its summary, one per line (the epilog of ``tokenskip --help``)."""
    return "\n".join(f"  {code.value}  {code.summary}" for code in ExitCode)
