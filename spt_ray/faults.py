"""How faults reach the user: one line each, in the project's words, never Ray's.

* Ctrl-C. Tune catches the first SIGINT inside `Tuner.fit`, stops the experiment after saving its state
  and returns as if it had finished: its trials in memory read TERMINATED, but the experiment state it
  saved says RUNNING or PENDING. The driver reads that state back after every `fit` and raises
  `SweepInterrupted`, so a sweep never goes on to select from, or retrain, a search that did not
  finish. Tune's own advice (`Tuner.restore(...)`, a Python API a CLI
  user cannot act on) is filtered out of its log (`tune_interrupt_messages`); the CLI prints one line
  naming `--resume` and exits 130.
* Errors raised inside Ray tasks and actors arrive wrapped in `RayTaskError`, whose text starts with
  `ray::SensitivityStore.get_ranking() (pid=...)` and hides the cause. `unwrap_ray_error` returns the
  original exception (a DataError about a truncated image, a BackboneError about unreadable weights,
  ...), so `spt-ray tune` prints the same line `spt-ray sensitivity` prints for the same input.

Nothing here imports Ray at module level: the CLI imports it on every error path.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
RESUME_HINT = "rerun the same command with --resume to continue it"
EXIT_BAD_INPUT, EXIT_INTERRUPTED = 2, 130
USER_ERRORS = (ValueError, KeyError, OSError, ImportError, RuntimeError)  # bad input, one line; others: a bug
_TUNE_LOGGER = "ray.tune.tune"  # where tune.run logs its SIGINT messages


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped a sweep; what finished is saved (checkpoints, Parquet) and `--resume` continues.

    A KeyboardInterrupt, so code that handles Ctrl-C keeps working; `str()` is the one line to show.
    """

    def __init__(self, sweep: str, stage: str):
        self.sweep, self.stage = sweep, stage
        super().__init__(f"sweep {sweep!r} interrupted during {stage}; {RESUME_HINT}")


class _TuneInterruptFilter(logging.Filter):
    """Drops Tune's `Tuner.restore(...)` advice and its trial dump; rewords its stop notice."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Tuner.restore" in message or message.startswith("Trials did not complete"):
            return False
        if message.startswith("Stop signal received"):
            record.msg, record.args = ("Ctrl-C: stopping the sweep, saving trial checkpoints and results "
                                       "(Ctrl-C again skips the saving)"), ()
        return True


@contextmanager
def tune_interrupt_messages() -> Iterator[None]:
    """For the duration: Tune's SIGINT messages in the project's words (see the module docstring)."""
    logger, quiet = logging.getLogger(_TUNE_LOGGER), _TuneInterruptFilter()
    logger.addFilter(quiet)
    try:
        yield
    finally:
        logger.removeFilter(quiet)


@contextmanager
def sigint_held() -> Iterator[None]:
    """Hold Ctrl-C for the duration and raise it (KeyboardInterrupt) once the block has finished.

    For `ray.init`: interrupted halfway, it leaves a half-started Ray whose teardown at interpreter exit
    crashes (SIGSEGV) instead of ending with the one line and exit 130.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and previous is not signal.SIG_IGN:
        raise KeyboardInterrupt


def unwrap_ray_error(err: BaseException) -> BaseException:
    """The exception a Ray task or actor raised (through nested RayTaskErrors); others unchanged.

    A RayError without a cause of its own (an actor or worker that died, a lost object) becomes a
    RuntimeError holding Ray's first line, which the CLI prints as one line.
    """
    try:
        from ray.exceptions import RayError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency; keep the CLI's error path import-safe
        return err
    for _ in range(32):  # a task awaited by an actor awaited by the driver nests one level per hop
        if not isinstance(err, RayTaskError) or err.cause is None or err.cause is err:
            break
        err = err.cause
    if isinstance(err, RayError):
        text = str(err).strip().splitlines()
        return RuntimeError(f"Ray: {text[0].rstrip('.') if text else type(err).__name__}; check the cluster "
                            f"(`ray status`), then {RESUME_HINT}")
    return err


def user_message(err: BaseException) -> str | None:
    """The one line to show for an error the user can fix (Ray's wrapping removed), None for a bug."""
    err = unwrap_ray_error(err)
    if not isinstance(err, USER_ERRORS):
        return None
    text = str(err.args[0] if isinstance(err, KeyError) and err.args else err).strip().splitlines()
    return text[0] if text else type(err).__name__


def report_errors(command: Callable[[], int], prog: str) -> int:
    """Run a command-line command: Ctrl-C -> one line and exit 130; bad input -> `<prog>: error: <line>` and
    exit 2 (SPT_DEBUG=1 shows the traceback instead); anything else is a bug and keeps its traceback."""
    try:
        return command()
    except KeyboardInterrupt as err:  # SweepInterrupted says where and names --resume
        print(f"{prog}: interrupted" + (f": {err}" if str(err) else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:
        message = user_message(err)
        if message is None or os.environ.get("SPT_DEBUG") == "1":
            raise
        print(f"{prog}: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT

