"""How a run ends: the signals that stop it, the run folder's status.json, and the one line that
says what was saved and how to continue.

Exit codes: 0 finished; 1 an error (its message says what to change); 2 a config error
(train.py, before any folder exists); 3 out of GPU memory; 130 stopped by SIGINT (Ctrl-C); 143
stopped by SIGTERM (Slurm at its time limit or on scancel; torchrun when another process failed).
A run killed outright (SIGKILL, a crash of the machine) leaves status.json at "running".
"""
from __future__ import annotations

import contextlib
import datetime
import os
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from config import write_json_atomic

EXIT_FINISHED, EXIT_ERROR, EXIT_OUT_OF_MEMORY = 0, 1, 3
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
RESUME_HINT = "to continue, run the same command with resume=auto"


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def signal_exit_code(signum: int) -> int:
    """The shell's convention for a process ended by a signal: 130 for SIGINT, 143 for SIGTERM."""
    return 128 + int(signum)


class TrainingError(RuntimeError):
    """A run cannot continue; the message says what happened and what to try (exit 1, no traceback)."""


class RunInterrupted(Exception):
    """A signal stopped the run where it cannot stop at a step boundary (before or after the
    training loop, or a second Ctrl-C): raised by RunSignals from wherever the run was."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal_name(signum))
        self.signum = int(signum)


# ------------------------------------------------------------------------------------------------
# Where the time goes
# ------------------------------------------------------------------------------------------------
# status.json's "timings_s": the run's wall time per category, so a person (or scripts/asset_time.py)
# sees what an asset costs: loading, pretraining, each training stage, the save points and the
# outputs. The activities a run reports fall into them by this rule:
#   "the start", "model loading", "preparation"      -> load (also what compiles while loading, e.g.
#                                                       nvdiffrast's CUDA extension)
#   "SDF pretraining"                                -> sdf_pretraining
#   "training iteration N (S stage)"                 -> S without "geometry_": coarse, fine, appearance
#                                                       (a stage of another phase keeps its own name)
#   "validation of iteration N"                      -> validation
#   "the checkpoint write of iteration N"            -> checkpoints
#   "the export", "the turntable video"              -> export, video
#   anything else                                    -> other
# Work compiled or captured on first use (Triton kernels, the UNet's CUDA graph) counts where it
# first runs. On CUDA the host runs ahead of the device by at most one training step (its reads
# are one step late and nothing here synchronizes), so a boundary between categories is accurate
# to about one step.
TIMING_CATEGORIES = ("load", "sdf_pretraining", "coarse", "fine", "appearance", "validation", "checkpoints",
                     "export", "video", "other")
_FIXED_CATEGORIES = {"the start": "load", "model loading": "load", "preparation": "load",
                     "SDF pretraining": "sdf_pretraining", "the export": "export", "the turntable video": "video"}
_TRAINING = re.compile(r"training iteration \d+ \((?:geometry_)?(.+) stage\)")


def timing_category(activity: str) -> str:
    """The category an activity's time is charged to (the rule above)."""
    fixed = _FIXED_CATEGORIES.get(activity)
    if fixed is not None:
        return fixed
    training = _TRAINING.fullmatch(activity)
    if training is not None:
        return training.group(1)
    if activity.startswith("validation"):
        return "validation"
    if activity.startswith("the checkpoint write"):
        return "checkpoints"
    return "other"


@dataclass
class RunProgress:
    """What the run has done so far: the facts its ending and status.json report.

    Setting `activity` charges the wall time since the previous change to the previous activity's
    category (`timings_s`, the rule above): one clock read per change, no device synchronize."""
    total: int                           # the config's iter
    activity: str = "the start"          # what it is doing now, e.g. "SDF pretraining"
    iteration: int = 0                   # the last finished (logged) training iteration
    checkpoint_it: int | None = None     # iteration of the checkpoint this run wrote or resumed from
    checkpoint_path: Path | None = None
    export_dir: Path | None = None       # set once the mesh is exported
    timings_s: dict[str, float] = field(default_factory=dict, compare=False)   # category -> seconds
    clock: Callable[[], float] = field(default=time.perf_counter, repr=False, compare=False)
    # When the timings begin (Unix time): a launcher compares it with its own start to see how long
    # the process took to get here (interpreter, imports, process group).
    timing_start_unix_s: float = field(default_factory=time.time, compare=False)

    def __post_init__(self) -> None:
        self._since = self.clock()       # when the current activity began

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "activity" and "_since" in self.__dict__:
            self._charge()
        super().__setattr__(name, value)

    def _charge(self) -> None:
        """Add the time since the last charge to the current activity's category."""
        now = self.clock()
        key = timing_category(self.activity)
        self.timings_s[key] = self.timings_s.get(key, 0.0) + (now - self._since)
        self._since = now

    def timings(self) -> dict[str, float]:
        """Seconds per category up to now, the current activity's time so far included."""
        self._charge()
        return {key: round(seconds, 3) for key, seconds in self.timings_s.items()}


@dataclass(frozen=True)
class RunEnd:
    """How the run ended: status.json's state, the exit code and the one line printed."""
    state: str                           # "finished" | "interrupted" | "failed"
    exit_code: int
    message: str
    signum: int | None = None
    root_cause: bool = True              # a failure that started in this process, not a peer's


# ------------------------------------------------------------------------------------------------
# status.json
# ------------------------------------------------------------------------------------------------
@dataclass
class RunStatus:
    """The run folder's status.json, so a person or a job script can tell a finished run from an
    interrupted, failed or still running (or killed) one. Rank 0 writes it, atomically; `enabled`
    turns on once the run folder exists (a config error leaves no folder)."""
    path: Path
    enabled: bool = False
    started: str = field(default_factory=lambda: _now())

    def write(self, state: str, progress: RunProgress, message: str = "", exit_code: int | None = None,
              signum: int | None = None) -> None:
        if not self.enabled:
            return
        write_json_atomic(self.path, {
            "state": state, "iteration": progress.iteration, "iterations": progress.total,
            "checkpoint_iteration": progress.checkpoint_it, "activity": progress.activity, "message": message,
            "exit_code": exit_code, "signal": None if signum is None else signal_name(signum),
            "started": self.started, "updated": _now(), "pid": os.getpid(), "host": socket.gethostname(),
            "timings_s": progress.timings(), "timing_start_unix_s": progress.timing_start_unix_s})


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------
class RunSignals:
    """SIGINT and SIGTERM for the whole run.

    In the training loop (inside `stopping_at_steps`) the first one asks every rank to stop after
    the current step (the request rides in the step's all-reduce): the checkpoint is written, and
    after SIGINT the mesh exported too (SIGTERM comes from a scheduler that kills the job soon
    after, so it skips the export; the resumed run does it). Anywhere else (model loading, SDF
    pretraining, the export), and on a second SIGINT, the run stops at once with RunInterrupted.
    A repeated SIGTERM is the same request (Slurm signals every process of a job step, and
    torchrun forwards it again), so it changes nothing.
    """

    def __init__(self, announce: bool) -> None:
        self.announce = announce         # rank 0 says what it does with the signal
        self.requested = 0               # the signal that asked for a stop at a step boundary
        self.ending = False              # the run is reporting how it ended: signals are ignored
        self._graceful = False
        self._held: list[int] | None = None   # inside `held`: the signals that arrived, in order
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "RunSignals":
        for signum in STOP_SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:           # not the main thread (some test runners): keep the defaults
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self._held is not None:
            self._held.append(signum)
            return
        if self.ending or (self.requested and signum == signal.SIGTERM):
            return
        if self._graceful and not self.requested:
            self.requested = signum
            self._say_stopping(signum)
            return
        raise RunInterrupted(signum)

    def _say_stopping(self, signum: int) -> None:
        if not self.announce:
            return
        then = ("saving a checkpoint and exporting (Ctrl-C again to quit now)" if signum == signal.SIGINT
                else "saving a checkpoint (the export is left to the resumed run)")
        print(f"\ninterrupt: finishing this step, then {then}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stopping_at_steps(self) -> Iterator[None]:
        """The training loop: a first signal stops the run after the current step."""
        self._graceful = True
        try:
            yield
        finally:
            self._graceful = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Signals that arrive inside are acted on when it ends: a checkpoint being written is
        finished (seconds) and recorded before the run stops, so the ending reports exactly what
        last.pt holds. (A signal mask would not do: the signal may land on another thread of the
        process, whose handler call still reaches Python at once.)"""
        outer, self._held = self._held, []
        try:
            yield
        finally:
            arrived, self._held = self._held, outer
            for signum in arrived:
                self._handle(signum, None)


@dataclass
class RunContext:
    """What a run's ending needs from the loop: the progress so far, status.json and the signals.
    Trainers built without one (tests, benchmarks) get a silent context: status.json stays off
    until enabled, and signals never entered install no handlers, so they never ask for a stop and
    hold nothing back."""
    progress: RunProgress
    status: RunStatus
    signals: RunSignals = field(default_factory=lambda: RunSignals(announce=False))


# ------------------------------------------------------------------------------------------------
# The one line
# ------------------------------------------------------------------------------------------------
def _kept(progress: RunProgress) -> str:
    return f"the checkpoint of iteration {progress.checkpoint_it} ({progress.checkpoint_path}) is kept"


def stopped_between_steps(signum: int, progress: RunProgress) -> RunEnd:
    """The end of a run that stopped at a step boundary after a signal."""
    saved = f"checkpoint of iteration {progress.iteration} saved ({progress.checkpoint_path})"
    exported = (f", mesh exported to {progress.export_dir}" if progress.export_dir is not None
                else "; the mesh is not exported")
    message = (f"stopped by {signal_name(signum)} after iteration {progress.iteration} of {progress.total}: "
               f"{saved}{exported}; {RESUME_HINT}")
    return RunEnd("interrupted", signal_exit_code(signum), message, signum)


def stopped_at_once(signum: int, progress: RunProgress) -> RunEnd:
    """The end of a run that a signal stopped in the middle of something (RunInterrupted)."""
    head = f"stopped by {signal_name(signum)} during {progress.activity}"
    if progress.checkpoint_it is None:
        why = " (the SDF pretraining is not checkpointed)" if progress.activity == "SDF pretraining" else ""
        tail = f"nothing to resume from yet{why}; the same command, with or without resume=auto, starts over"
    elif progress.checkpoint_it >= progress.total:
        tail = f"{_kept(progress)}, training is complete; run the same command with resume=auto to export"
    else:
        tail = f"{_kept(progress)}, later work is lost; {RESUME_HINT}"
    return RunEnd("interrupted", signal_exit_code(signum), f"{head}: {tail}", signum)


def finished(progress: RunProgress) -> RunEnd:
    return RunEnd("finished", EXIT_FINISHED, f"finished {progress.total} iterations; mesh in {progress.export_dir}")


def failed(message: str, progress: RunProgress, exit_code: int = EXIT_ERROR, resumable: bool = False,
           root_cause: bool = True) -> RunEnd:
    """A failure's end: the error's own message, and what survives of the run (`resumable`: the
    failure is not the checkpoint's, e.g. out of memory, so resuming from it is the way on;
    `root_cause`: False where another process failed first)."""
    if progress.checkpoint_it is not None:
        message = f"{message}; {_kept(progress)}" + ("; resume=auto continues from it" if resumable else "")
    return RunEnd("failed", exit_code, message, root_cause=root_cause)
