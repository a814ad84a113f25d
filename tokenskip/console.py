"""What a person sees while a job runs: a quiet console, and everything else in a log file.

Quiet (the default): the console shows the plan, what the wait is (engine start), one live line on a
TTY (tqdm) or one line per committed shard otherwise (CI, ``ray job logs``), warnings from tokenskip
itself (they ask for the user's action) and errors from anything. Every log record goes to the log
file, and so does everything the local Ray's workers print (vLLM's INFO lines, its start-up
warnings): Ray is told so with its own settings (``log_to_driver=False``, a
``worker_process_setup_hook`` that points the worker's stdout/stderr at the log file), and Ray
Data's progress lines and notices go to Ray's own ``ray-data.log`` only (``RAY_DATA_LOGGING_CONFIG``);
nothing parses their text. ``--verbose`` streams everything as before.

On a cluster (``RAY_ADDRESS``) the workers run on other machines, so their output stays in Ray's
own logs (``ray logs``, the dashboard); the driver's records still go to the log file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

from tokenskip.progress import ProgressBoard

# Read by the worker setup hook: the file a local Ray's workers append their output to.
WORKER_LOG_ENV = "TOKENSKIP_WORKER_LOG"
RAY_DATA_LOGGING_ENV = "RAY_DATA_LOGGING_CONFIG"
# vLLM gives its loggers their own stdout handler unless told not to; off, an engine in the driver
# (evaluate) logs through the root logger, i.e. to the log file. Workers keep vLLM's handler: their
# stdout is the log file already.
VLLM_LOGGING_ENV = "VLLM_CONFIGURE_LOGGING"
RAY_DATA_QUIET_CONFIG = Path(__file__).parent / "configs" / "ray_data_logging.yaml"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """Warnings of tokenskip's own loggers (they say what to do) and errors of any logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True
        return record.levelno >= logging.WARNING and record.name.split(".")[0] == "tokenskip"


class RunLog:
    """The job's log file. Records go to a staging file until the command knows where its output goes,
    then to ``logs/<command>-<started>.log`` there (its content so far copied), when that is a local
    folder (:func:`place_log`): ``run`` and ``refresh`` the run's folder, ``train`` its checkpoint
    storage path, ``evaluate`` its output folder, ``compress`` its output's. A remote output keeps the
    staging file (printed; ``run`` uploads a copy when it ends, :meth:`text`). A staging file nobody
    was shown (``show``, ``storage``, a dry run, a command that failed before it knew its output) is
    removed when the command ends, so the temp folder does not fill with them."""

    def __init__(self, command: str):
        self.name = f"{command}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}.log"
        self.staging = Path(tempfile.gettempdir()) / "tokenskip-logs"
        self.staging.mkdir(parents=True, exist_ok=True)
        self.path = self.staging / self.name
        self.announced = False
        self._handler = self._file_handler(self.path)

    @staticmethod
    def _file_handler(path: Path) -> logging.FileHandler:
        handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        return handler

    @property
    def handler(self) -> logging.Handler:
        return self._handler

    def move_to(self, folder: Path) -> Path:
        """Continue the log in ``folder`` (created), keeping what was written so far."""
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / self.name
        if target == self.path:
            return target
        self._handler.flush()
        target.write_bytes(self.path.read_bytes())
        handler = self._file_handler(target)
        root = logging.getLogger()
        root.addHandler(handler)
        root.removeHandler(self._handler)
        self._handler.close()
        self.path.unlink(missing_ok=True)
        self.path, self._handler = target, handler
        if os.environ.get(WORKER_LOG_ENV):
            os.environ[WORKER_LOG_ENV] = str(target)  # workers started from now on write here
        return target

    def text(self) -> bytes:
        self._handler.flush()
        return self.path.read_bytes()

    def announce(self) -> Path:
        """The log's path, to print: a staging file that was shown to the user is kept."""
        self.announced = True
        return self.path

    def close(self) -> None:
        self._handler.close()
        if self.path.parent == self.staging and not self.announced:
            self.path.unlink(missing_ok=True)


def place_log(run_log: RunLog | None, output: str | os.PathLike | None) -> None:
    """Continue a command's log in ``<output>/logs/`` when ``output`` (where the command writes) is a
    local folder, and print where the log is (stderr). Nothing when verbose (no log file)."""
    if run_log is None:
        return
    folder = local_folder(output)
    if folder is not None:
        try:
            run_log.move_to(folder / "logs")
        except OSError as exc:  # the command's own output check says what is wrong with the folder
            logging.getLogger(__name__).info("log stays in %s: %s", run_log.path.parent, exc)
    print(f"log: {run_log.announce()}", file=sys.stderr, flush=True)


def local_folder(location: str | os.PathLike | None) -> Path | None:
    """``location`` as an absolute local path; None for a remote URL (``s3://...``) or None."""
    if location is None:
        return None
    text = os.fspath(location)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        return None
    return Path(os.path.abspath(os.path.expanduser(text)))


@contextlib.contextmanager
def console_logging(command: str, *, verbose: bool) -> Iterator[RunLog | None]:
    """Logging for one CLI command; yields its log file (None when verbose). On exit the process's
    logging and environment are as before (the CLI also runs in-process, e.g. in tests).

    Enter it before Ray or Ray Data is imported: Ray Data reads its logging config at import.
    """
    root = logging.getLogger()
    saved_level, saved_env = root.level, {
        k: os.environ.get(k) for k in (WORKER_LOG_ENV, RAY_DATA_LOGGING_ENV, VLLM_LOGGING_ENV)
    }
    added: list[logging.Handler] = []
    run_log = None
    if verbose:
        if not root.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(LOG_FORMAT))
            added.append(handler)
        root.setLevel(logging.DEBUG)
    else:
        os.environ.setdefault(RAY_DATA_LOGGING_ENV, str(RAY_DATA_QUIET_CONFIG))
        run_log = RunLog(command)
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        console.addFilter(_ConsoleFilter())
        added += [run_log.handler, console]
        root.setLevel(logging.INFO)
        os.environ[WORKER_LOG_ENV] = str(run_log.path)
        os.environ.setdefault(VLLM_LOGGING_ENV, "0")
        logging.captureWarnings(True)  # Python warnings (deprecations of libraries) to the log file
    for handler in added:
        root.addHandler(handler)
    try:
        yield run_log
    except BaseException:
        if run_log is not None and not run_log.announced:  # a crash: its log is what explains it
            print(f"log: {run_log.announce()}", file=sys.stderr, flush=True)
        raise
    finally:
        for handler in added:
            root.removeHandler(handler)
        if run_log is not None:
            root.removeHandler(run_log.handler)  # it may have moved to the run's folder
            run_log.close()
            logging.captureWarnings(False)
        root.setLevel(saved_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def redirect_worker_output() -> None:
    """Ray ``worker_process_setup_hook``: this worker's stdout and stderr (Python and C alike: vLLM,
    torch, OpenMP warnings) append to the job's log file. Runs in each worker of a local Ray."""
    path = os.environ.get(WORKER_LOG_ENV)
    if not path:
        return
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:  # the log file is not reachable from here: Ray's own worker logs keep the output
        return
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    # The worker's own records (tokenskip's stage lines) at INFO, into the same file.
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)


def _clock(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "--:--"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class _BoardFollower:
    """A display fed by a progress board: a thread drains the board about every ``refresh_s`` and
    hands each event to :meth:`apply`, then calls :meth:`tick` (a live line redraws there).
    :meth:`_stop_following` ends the thread and applies what the board still holds."""

    board: ProgressBoard | None
    refresh_s: float
    _thread: threading.Thread | None = None  # set while following

    def apply(self, event: dict[str, Any]) -> None:
        raise NotImplementedError

    def tick(self) -> None:
        pass

    def _follow(self, name: str) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=name, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self._drain()
            self.tick()

    def _drain(self) -> None:
        if self.board is not None:
            for event in self.board.drain():
                self.apply(event)

    def _stop_following(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=10)
            self._thread = None
        self._drain()


class RunDisplay(_BoardFollower):
    """The live view of one run: stage, shards committed / total, samples generated, kept so far and
    acceptance, tokens/s and ETA. On a TTY one tqdm line redrawn about once a second; otherwise a
    line per committed shard. Figures before the first commit come from the stages' progress board.
    """

    def __init__(
        self,
        *,
        total_shards: int,
        total_samples: int,
        stream: TextIO | None = None,
        tty: bool | None = None,
        board: ProgressBoard | None = None,
        refresh_s: float = 1.0,
    ):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.total_shards = total_shards
        self.total_samples = total_samples
        self.board = board
        self.refresh_s = refresh_s
        self.stage = "starting"
        self.shards = 0
        self.samples = 0  # generated, from the board (or from commits when there is no board)
        self.board_samples = 0
        self.tokens = 0
        self.committed_samples = 0
        self.kept = 0
        self.graded = 0
        self.engine_ready_at: float | None = None
        self.started_at = time.monotonic()
        self._lock = threading.Lock()
        self._bar = None

    # -- lines ---------------------------------------------------------------------------------
    def say(self, text: str) -> None:
        """One line above the live display (or just a line)."""
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def start(self) -> None:
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total_shards,
                file=self.stream,
                bar_format="{desc} {bar:12} {n_fmt}/{total_fmt} shards{postfix}",  # tqdm puts ", " before the postfix
                dynamic_ncols=True,
                leave=True,
            )
            self._redraw()
        if self.board is not None or self.tty:
            self._follow("run-display")

    def engine_starting(self, *, model: str, device: str, eager: bool) -> None:
        self.stage = "starting vLLM engine"
        if eager:
            wait = "eager mode, no compile: ~20 s on CPU"
        elif device == "cpu":
            wait = "first start compiles, ~2 min on CPU; later starts load vLLM's compile cache"
        else:
            wait = "first start compiles and captures CUDA graphs (minutes); later starts use the cache"
        self.say(f"starting vLLM engine (model {model}, device {device}): {wait}")

    # -- events --------------------------------------------------------------------------------
    def apply(self, event: dict[str, Any]) -> None:
        """One progress-board event (see the stages that post them)."""
        kind = event.get("event")
        with self._lock:
            if kind == "engine_ready":
                first = self.engine_ready_at is None
                if first:
                    self.engine_ready_at = time.monotonic()
                    self.stage = "generating"
                seconds = event.get("seconds")
            elif kind == "generated":
                self.board_samples += int(event.get("samples", 0))
                self.samples = max(self.samples, min(self.board_samples, self.total_samples))
                self.tokens += int(event.get("tokens", 0))
                if self.engine_ready_at is None:  # a board started after the engine
                    self.engine_ready_at = time.monotonic()
                    self.stage = "generating"
                return
            else:
                return
        if first:
            self.say(f"vLLM engine ready in {seconds:.0f} s" if seconds is not None else "vLLM engine ready")

    def shard_committed(self, summary: Any | None) -> None:
        """A shard committed; ``summary``: its :class:`~tokenskip.summary.ShardSummary` (or None)."""
        with self._lock:
            self.shards += 1
            if summary is not None:
                engine = summary.engine
                generated = engine.samples_generated if engine is not None else 0
                self.committed_samples += generated
                self.kept += summary.kept_samples
                self.graded += generated
                if self.board_samples == 0 and engine is not None:  # no board: commits are the figures
                    self.samples = self.committed_samples
                    self.tokens += engine.tokens_generated
            self.samples = max(self.samples, self.committed_samples)
            if self.shards == self.total_shards:
                self.stage = "finishing"
        if self._bar is not None:
            self._bar.update(1)
            self._redraw()
        else:
            self.say(f"shard {self.shards}/{self.total_shards} committed | {self.figures()}")

    # -- figures -------------------------------------------------------------------------------
    def tokens_per_second(self) -> float | None:
        if self.engine_ready_at is None:
            return None
        elapsed = time.monotonic() - self.engine_ready_at
        return self.tokens / elapsed if elapsed > 1 else None

    def eta_seconds(self) -> float | None:
        if self.engine_ready_at is None or self.samples == 0:
            return None
        elapsed = time.monotonic() - self.engine_ready_at
        rate = self.samples / elapsed if elapsed > 0 else 0
        return (self.total_samples - self.samples) / rate if rate > 0 else None

    def figures(self) -> str:
        with self._lock:
            acceptance = f" ({self.kept / self.graded:.0%})" if self.graded else ""
            speed = self.tokens_per_second()
            parts = [
                f"samples {self.samples}/{self.total_samples}",
                f"kept {self.kept}{acceptance}",
                f"{speed:.0f} tok/s" if speed is not None else "-- tok/s",
                f"ETA {_clock(self.eta_seconds())}",
            ]
        return " | ".join(parts)

    def tick(self) -> None:
        self._redraw()

    def _redraw(self) -> None:
        if self._bar is None:
            return
        self._bar.set_description_str(f"{self.stage} {_clock(time.monotonic() - self.started_at)}", refresh=False)
        self._bar.set_postfix_str(self.figures(), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        self._stop_following()
        if self._bar is not None:
            self.stage = "done"
            self._redraw()
            self._bar.close()
            self._bar = None


class StepDisplay(_BoardFollower):
    """The live view of a training run: step / total, loss, tokens/s and ETA, from the ``train_step``
    events rank 0 posts to the progress board. On a TTY one tqdm line; otherwise a line every
    ``every`` steps (and at the last)."""

    def __init__(
        self,
        *,
        board: ProgressBoard | None,
        stream: TextIO | None = None,
        tty: bool | None = None,
        every: int = 10,
        refresh_s: float = 1.0,
    ):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.board = board
        self.every = max(1, every)
        self.refresh_s = refresh_s
        self.step = 0
        self.total: int | None = None
        self._first_step_at: tuple[float, int] | None = None
        self._bar = None

    def start(self) -> None:
        if self.board is not None:
            self._follow("train-display")

    def apply(self, event: dict[str, Any]) -> None:
        if event.get("event") != "train_step":
            return
        step, total = int(event["step"]), int(event["total"])
        now = time.monotonic()
        if self._first_step_at is None:
            self._first_step_at = (now, step)
        self.step, self.total = step, total
        eta = None
        first_t, first_step = self._first_step_at
        if step > first_step:
            eta = (total - step) * (now - first_t) / (step - first_step)
        figures = f"loss {event['loss']:.4f} | {event['tokens_per_s']:.0f} tok/s | ETA {_clock(eta)}"
        if self.tty:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=total, file=self.stream, bar_format="training {bar:12} {n_fmt}/{total_fmt} steps{postfix}"
                )
            self._bar.n = step
            self._bar.set_postfix_str(figures, refresh=False)
            self._bar.refresh()
        elif step % self.every == 0 or step == total:
            print(f"step {step}/{total} | {figures}", file=self.stream, flush=True)

    def close(self) -> None:
        self._stop_following()
        if self._bar is not None:
            self._bar.close()
            self._bar = None
