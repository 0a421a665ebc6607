"""A run's safety: the workdir lock, stop signals and preemption, non-finite steps, saves.

The loop calls it at a few named points:

    with WorkdirLock(workdir), StopSignals() as signals:   # one run per workdir
        saves = Saves(mngr)
        ...
        stop = signals.stop_requested(step, mngr) or saves.poll()   # after every step
        stop = stop or nonfinite.check(first_step, flags)            # at every log step
        saves.save(step, state, meta, metrics)                       # checkpoint steps
        saves.close()                                                # the end

Every way a run stops early is a `RunStopped` with a one-line message and the exit
status of `flaxformer-lite train` (docs/training.md, "Faults and recovery"). The loop
raises it only after the last checkpoint, metrics and summary are written.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import errno
import fcntl
import json
import logging
import os
import pathlib
import signal
import socket
import sys
import threading
import traceback
import warnings
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from flaxformer_lite.config import ConfigError
from flaxformer_lite.runtime import checkpoint

EXIT_NONFINITE = 3  # train.nan_policy stopped the run
EXIT_SAVE_FAILED = 74  # sysexits EX_IOERR: a checkpoint could not be written (disk full...)
EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: stopped by SIGTERM/SIGINT, resume with --resume

LOCK_FILE = ".lock"


class RunStopped(Exception):
    """The run stopped before its last step; `exit_code` is the CLI's exit status."""

    exit_code = 1

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class Preempted(RunStopped):
    exit_code = EXIT_PREEMPTED


class NonFiniteStop(RunStopped):
    exit_code = EXIT_NONFINITE


class SaveFailed(RunStopped):
    exit_code = EXIT_SAVE_FAILED


class WorkdirBusy(ConfigError):
    """Another live process holds the workdir's lock."""


# ------------------------------------------------------------------------------- lock


class WorkdirLock:
    """WORKDIR/.lock, held with flock(2) for the run's life and naming its host and pid.

    The kernel releases a flock when its process dies, however it dies, so a lock file
    whose flock can be taken was left by a dead run: it is taken over with a warning. A
    held one refuses the second run with WorkdirBusy. Only process 0 of a multi-process
    run locks (`enabled`).
    """

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(workdir) / LOCK_FILE
        self.enabled = enabled
        self._fd: Optional[int] = None
        self._made_workdir = False

    def __enter__(self) -> "WorkdirLock":
        if not self.enabled:
            return self
        self._made_workdir = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 4096).decode(errors="replace").strip()
                os.close(fd)
                raise WorkdirBusy(
                    f"{self.path.parent} is in use by another run ({_describe(owner)}, {self.path}): "
                    "wait for it to finish or choose another --workdir"
                ) from None
            # The holder may have unlinked the file between our open and our flock.
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        if previous:
            warnings.warn(
                f"{self.path}: taking over the lock of a run that is gone ({_describe(previous)})",
                stacklevel=2,
            )
        owner = {"host": socket.gethostname(), "pid": os.getpid(),
                 "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(owner) + "\n").encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
        if self._made_workdir and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()  # refused before anything was written: leave nothing


class _QuietOrbax(logging.Filter):
    """Orbax's records without their tracebacks, and without its warning at each save
    that has no metrics (a step that was not evaluated)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "orbax" not in record.pathname:
            return True
        record.exc_info, record.exc_text = None, None
        return record.getMessage() != "Requested `tracked_metric`; did not provide metrics."


class _QuietOrbaxTasks(logging.Filter):
    """asyncio's "exception was never retrieved" records of orbax's abandoned writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        tb = record.exc_info[2] if record.exc_info else None
        return not any("orbax" in frame.filename for frame in traceback.extract_tb(tb))


def _quiet_failed_saves() -> None:
    """Leave the tracebacks of a failed save out of stderr (we report it in one line).

    Orbax logs each of its failed threads with a traceback, and asyncio each of its writes
    whose error nobody retrieved. Orbax also closes its event loop at the first failed
    write, and tensorstore reports each of that save's writes that finishes later as an
    unraisable error: a traceback apiece, over a hundred on a full disk. All go on after
    the save is given up, even after the run, so these filters stay installed (once per
    process): tracebacks of records logged from orbax's files are dropped, asyncio's
    records of exceptions raised through orbax's code, and an unraisable RuntimeError
    "Event loop is closed" that no object raised and whose every frame is in asyncio
    (tensorstore's callback, from C).
    """
    hook = sys.unraisablehook
    if getattr(hook, "ffl_quiet", False):
        return
    logging.getLogger("absl").addFilter(_QuietOrbax())
    logging.getLogger("asyncio").addFilter(_QuietOrbaxTasks())

    def quiet(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        closed_loop = (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                       and unraisable.object is None and frames and all("asyncio" in f.filename for f in frames))
        if not closed_loop:
            hook(unraisable)

    quiet.ffl_quiet = True
    sys.unraisablehook = quiet


def _write_checksums(directory: pathlib.Path) -> None:
    try:
        checkpoint.write_checksums(directory)
    except FileNotFoundError:
        pass  # rotated out by a later save before its checksums were written
    except OSError as e:  # a full disk: the step is complete, and usable without them
        warnings.warn(f"could not write {directory / checkpoint.CHECKSUM_FILE} ({describe_io_error(e)}): "
                      "--resume will trust that step if it loads and is finite", stacklevel=2)


def describe_io_error(error: BaseException) -> str:
    """One line for a failed write; "the disk is full (...)" when it says so, whether as
    an OSError or as the message of tensorstore's RESOURCE_EXHAUSTED."""
    text = str(error).splitlines()[0] if str(error) else ""
    reason = f"{type(error).__name__}: {text[:500]}"
    full = getattr(error, "errno", None) == errno.ENOSPC or os.strerror(errno.ENOSPC) in str(error)
    return f"the disk is full ({reason})" if full else reason


def _describe(owner_json: str) -> str:
    try:
        owner = json.loads(owner_json)
        return f"pid {owner['pid']} on host {owner['host']} since {owner['since']}"
    except (ValueError, KeyError, TypeError):
        return "owner unknown"


# ------------------------------------------------------------------------------- signals


class StopSignals:
    """SIGTERM (how preemption arrives) and SIGINT ask the run to stop after this step.

    One process: a handler notes the signal and the loop stops at the next step. Several
    processes: JAX's preemption service (started by jax.distributed.initialize) owns
    SIGTERM and makes all processes agree on the step to stop at; SIGINT is passed on to
    it as a SIGTERM; the loop asks orbax's `reached_preemption(step)` every step. A
    repeated signal while the final checkpoint is written is noted and otherwise
    ignored: nothing is cut short (SIGKILL still works, and leaves the previous
    checkpoint valid).
    """

    def __init__(self, log=print):
        self.received: Optional[str] = None
        self._log = log
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is not threading.main_thread():
            return self  # Python delivers signals to the main thread only
        for sig in (signal.SIGTERM, signal.SIGINT):
            if sig == signal.SIGTERM and jax.process_count() > 1:
                continue
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if jax.process_count() > 1 and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # through JAX's preemption notifier
        if self.received is None:
            self.received = name
            message = f"received {name}: finishing this step, then saving a checkpoint\n"
        else:
            message = f"received {name} again: already stopping once this step is saved\n"
        os.write(2, message.encode())  # not print: a handler may interrupt a print

    def stop_requested(self, step: int, mngr: ocp.CheckpointManager) -> Optional[Preempted]:
        """A Preempted reason once this process (or, with several, all) should stop at `step`."""
        stop = mngr.reached_preemption(step) if jax.process_count() > 1 else self.received is not None
        if not stop:
            return None
        # Several processes: one that got no signal itself learns of the stop from JAX's
        # preemption service, which a SIGTERM to any process (SIGINT passed on) starts.
        return Preempted(f"stopped by {self.received or 'a preemption notice (SIGTERM to one of the processes)'} "
                         f"at step {step}", step)


# ------------------------------------------------------------------------------- non-finite


class NonFiniteSteps:
    """Host-side account of the steps whose loss, gradient or learning rate was not finite.

    The jitted step never applies such an update (step.py); it reports a 0/1 flag per
    step, which the loop reads at log steps together with the other metrics, so this
    costs no extra device sync. train.nan_policy=skip warns and goes on until
    max_nonfinite_streak such steps in a row; stop stops at the first one.
    """

    def __init__(self, policy: str, max_streak: int, streak: int = 0):
        self.policy, self.max_streak, self.streak = policy, max_streak, streak
        self.since: Optional[int] = None  # once stopped: the first of the non-finite steps it stopped for

    def check(self, first_step: int, flags: list[float]) -> Optional[NonFiniteStop]:
        """Account for steps first_step, first_step+1, ... with these flags."""
        bad = [first_step + i for i, f in enumerate(flags) if f]
        for f in flags:
            self.streak = self.streak + 1 if f else 0
        if not bad:
            return None
        steps = ", ".join(map(str, bad[:10])) + (", ..." if len(bad) > 10 else "")
        what = f"non-finite loss, gradient or learning rate at step {steps}"
        if self.policy == "stop":
            self.since = bad[0]
            return NonFiniteStop(f"{what}: update skipped and run stopped (train.nan_policy=stop)", bad[0])
        if self.streak >= self.max_streak:
            self.since = first_step + len(flags) - self.streak
            return NonFiniteStop(
                f"{what}: {self.streak} non-finite steps in a row up to step {first_step + len(flags) - 1} "
                f"(train.max_nonfinite_streak={self.max_streak}): lower train.learning_rate or check the data",
                bad[-1],
            )
        warnings.warn(f"{what}: update skipped (train.nan_policy=skip)", stacklevel=2)
        return None


# ------------------------------------------------------------------------------- saves


class Saves:
    """Checkpoint saves that are checked: the state must be finite, a failed background
    save is noticed at the next step (`poll`), and every complete step gets its
    checksums, written in a background thread on process 0."""

    def __init__(self, mngr: ocp.CheckpointManager):
        self.mngr = mngr
        _quiet_failed_saves()
        self.pending: Optional[int] = None  # the step being written in the background
        self.last_good: Optional[int] = mngr.latest_step()
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ffl-checksums")
        self._hashing: list[concurrent.futures.Future] = []

    def save(self, step: int, state: Any, *, meta: dict, metrics: Optional[dict]) -> None:
        """Start saving `state` (a TrainState) at `step`; raise NonFiniteStop or SaveFailed.

        If the previous save turns out to have failed, this one is still made, as the
        last attempt, and then that failure is raised.
        """
        try:
            self._finish(block=True)
        except SaveFailed as failed:
            self.save(step, state, meta=meta, metrics=metrics)
            raise failed from None
        # The previous step's checksums go to disk before this save can fill it: every
        # complete step but the newest is checked on --resume.
        concurrent.futures.wait(self._hashing)
        if not checkpoint.all_finite((state.params, state.opt_state)):
            raise NonFiniteStop(
                f"the state at step {step} is not finite: not saved, so the latest stays as it was ({self.intact()})", step
            )
        extra = {"opt_state": state.opt_state, "step": state.step, "rng": state.rng}
        if state.ref_params is not None:  # DPO's frozen reference: a resumed run needs it again
            extra["ref_params"] = state.ref_params
        try:
            checkpoint.save(
                self.mngr, step, params=state.params, extra=extra,
                meta=meta, metrics=metrics,
            )
        except Exception as e:  # noqa: BLE001 - any failure to write is reported the same way
            raise self._failed(step, e) from None
        self.pending = step

    def poll(self) -> Optional[SaveFailed]:
        """After each step: a SaveFailed if the background save has just failed."""
        if self.pending is None or self.mngr.is_saving_in_progress():
            return None
        try:
            self._finish(block=False)
        except SaveFailed as e:
            return e
        return None

    def close(self) -> None:
        """Wait for the last save and its checksums; raise SaveFailed if it failed."""
        try:
            self._finish(block=True)
        finally:
            concurrent.futures.wait(self._hashing)
            self._hasher.shutdown()
        for f in self._hashing:
            f.result()

    def settle(self) -> str:
        """After an unexpected error: with one process, wait for the save in flight and its
        checksums, so that it completes; with several, whose peers may be gone and would
        hold that wait forever, abandon it (orbax's temporary directory, which resume
        ignores). Returns, in words, which checkpoint is the latest; never raises. A last
        `save` (one process) and `close` may follow."""
        step, abandoned = self.pending, ""
        if step is not None and jax.process_count() > 1:
            self.pending = None
            if checkpoint.step_dir(self.mngr, step).is_dir():  # renamed from its temporary name: complete
                self.last_good = step
                abandoned = f"the checkpoint of step {step} had completed; "
            else:
                abandoned = f"the checkpoint of step {step} in flight was abandoned; "
        try:
            self._finish(block=True)
            concurrent.futures.wait(self._hashing)
        except Exception as e:  # noqa: BLE001 - reported, not raised: an error is on its way up
            return str(e) if isinstance(e, SaveFailed) else describe_io_error(e)
        completed = "the checkpoint in flight was completed; " if step is not None and not abandoned else ""
        return f"{abandoned}{completed}{self.intact()}"

    def _finish(self, *, block: bool) -> None:
        if self.pending is None:
            return
        step, self.pending = self.pending, None
        try:
            self.mngr.wait_until_finished()
        except Exception as e:  # noqa: BLE001
            raise self._failed(step, e) from None
        self.last_good = step
        if jax.process_index() == 0:
            directory = checkpoint.step_dir(self.mngr, step)
            self._hashing.append(self._hasher.submit(_write_checksums, directory))

    def _failed(self, step: int, error: Exception) -> SaveFailed:
        return SaveFailed(f"checkpoint of step {step} failed: {describe_io_error(error)}; {self.intact()}", step)

    def intact(self) -> str:
        """Which checkpoint is intact, in words."""
        if self.last_good is None:
            return "there is no earlier checkpoint"
        return f"checkpoint {checkpoint.step_dir(self.mngr, self.last_good)} is intact"
