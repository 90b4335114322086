"""The run queue: one train.py subprocess at a time per worker (one worker per GPU), jobs waiting in
order, and what the page shows of each: queue position, progress from the run folder, the latest
validation image, the exported files and, for a failed run, train.py's own `error: ...` line."""
from __future__ import annotations

import collections
import enum
import json
import os
import shutil
import subprocess
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from config import PROJECT_ROOT
from webapp.plan import Step

OUTPUT_LINES = 200                 # lines of a run's output kept in memory (all of it goes to its .log)
DOWNLOAD_SUFFIXES = (".obj", ".mtl", ".png", ".glb", ".hdr")
STOP_WAIT_S = 30.0                 # on shutdown, time a run gets to checkpoint and export before a kill


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"


class OutputTail:
    """The last lines of a run's output; tqdm's carriage-return updates count as lines."""

    def __init__(self, log_path: Path | None = None) -> None:
        self.lines: collections.deque[str] = collections.deque(maxlen=OUTPUT_LINES)
        self._partial = ""
        self._log = log_path.open("a", encoding="utf-8") if log_path is not None else None

    def feed(self, text: str) -> None:
        if self._log is not None:
            self._log.write(text)
            self._log.flush()
        parts = (self._partial + text).replace("\r", "\n").split("\n")
        self._partial = parts.pop()
        self.lines.extend(p for p in parts if p.strip())

    def close(self) -> None:
        self.feed("\n")
        if self._log is not None:
            self._log.close()
            self._log = None

    def last_line(self) -> str:
        return self._partial.strip() or (self.lines[-1] if self.lines else "")

    def error_line(self) -> str | None:
        """train.py's one-line diagnosis (`error: ...`), the last one printed."""
        return next((line for line in reversed(self.lines) if line.startswith("error: ")), None)


@dataclass
class Job:
    steps: list[Step]
    folder: Path
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    state: JobState = JobState.QUEUED
    step_index: int = 0
    error: str | None = None
    output: OutputTail = field(default_factory=OutputTail)
    scratch: Path | None = None        # the job's upload folder, removed when the job ends

    @property
    def step(self) -> Step:
        return self.steps[self.step_index]

    @property
    def done(self) -> bool:
        return self.state in (JobState.FINISHED, JobState.FAILED)


Command = Callable[[Step], list[str]]


def train_command(step: Step) -> list[str]:
    return step.command(sys.executable)


class JobQueue:
    """Jobs run in submission order, one per worker at a time. `slots` names each worker's GPU
    (a CUDA_VISIBLE_DEVICES value) or None for a worker that leaves the environment as it is."""

    def __init__(self, slots: list[str | None], command: Command = train_command,
                 cwd: Path = PROJECT_ROOT) -> None:
        self._command, self._cwd = command, cwd
        self._waiting: list[Job] = []
        self._running: dict[str, subprocess.Popen] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, args=(slot,), daemon=True, name=f"runs-{slot}")
                         for slot in slots]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------------------------------- queue
    def submit(self, job: Job) -> int:
        """Queue a job; returns its position (1: next to start)."""
        with self._cond:
            self._waiting.append(job)
            self._cond.notify()
            return len(self._waiting)

    def position(self, job: Job) -> int:
        """1-based place among waiting jobs; 0 once it has started."""
        with self._cond:
            return self._waiting.index(job) + 1 if job in self._waiting else 0

    def running(self) -> int:
        with self._cond:
            return len(self._running)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._waiting and not self._stopping:
                self._cond.wait()
            return None if self._stopping else self._waiting.pop(0)

    # ---------------------------------------------------------------------------------------- runs
    def _work(self, slot: str | None) -> None:
        while (job := self._next()) is not None:
            try:
                self._run_job(job, slot)
            except Exception as e:   # noqa: BLE001 - whatever went wrong, the worker must serve the next job
                job.state, job.error = JobState.FAILED, f"error: could not run train.py: {type(e).__name__}: {e}"
            finally:
                if job.scratch is not None:
                    shutil.rmtree(job.scratch, ignore_errors=True)

    def _run_job(self, job: Job, slot: str | None) -> None:
        job.state = JobState.RUNNING
        for index, step in enumerate(job.steps):
            job.step_index = index
            code = self._run_step(job, step, slot)
            if code != 0:
                job.state, job.error = JobState.FAILED, failure_message(job.output, code)
                return
        job.state = JobState.FINISHED

    def _run_step(self, job: Job, step: Step, slot: str | None) -> int:
        job.folder.mkdir(parents=True, exist_ok=True)
        job.output = OutputTail(job.folder / f"{step.name}.log")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if slot is not None:
            env["CUDA_VISIBLE_DEVICES"] = slot
        # Own session: a Ctrl-C in the app's terminal reaches the app, which then stops its runs.
        proc = subprocess.Popen(self._command(step), cwd=self._cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        with self._cond:
            self._running[job.id] = proc
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                job.output.feed(chunk.decode("utf-8", errors="replace"))
            return proc.wait()
        finally:
            proc.stdout.close()
            job.output.close()
            with self._cond:
                self._running.pop(job.id, None)

    def shutdown(self) -> None:
        """Stop taking jobs; running ones get SIGTERM (train.py checkpoints and exports), then a kill."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
            procs = list(self._running.values())
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                proc.kill()


def failure_message(output: OutputTail, code: int) -> str:
    """train.py's own `error: ...` line, else the exit code and the last output line."""
    line = output.error_line()
    if line is not None:
        return line
    last = output.last_line()
    return f"error: train.py exited with code {code}" + (f"; last output: {last}" if last else "")


# ------------------------------------------------------------------------------------------------
# What a run folder shows
# ------------------------------------------------------------------------------------------------
def latest_record(run_dir: Path) -> dict | None:
    """The last complete line of the run's log.jsonl."""
    path = run_dir / "log.jsonl"
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 65536))
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue   # a line being written
    return None


def planned_iterations(run_dir: Path) -> int | None:
    """The run's `iter`, from the resolved config.json train.py writes before training."""
    try:
        return int(json.loads((run_dir / "config.json").read_text())["iter"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def latest_validation(run_dir: Path) -> Path | None:
    """The newest save point's main image: shaded (appearance) or normals (geometry)."""
    images = sorted((run_dir / "validation").glob("it*_*.png"))
    if not images:
        return None
    newest = images[-1].name.split("_", 1)[0]
    current = [p for p in images if p.name.startswith(newest + "_")]
    for wanted in ("shaded", "normal"):
        for p in current:
            if p.stem.endswith("_" + wanted):
                return p
    return current[0]


def exported_files(run_dir: Path) -> list[Path]:
    """The run's dmtet_mesh/ files a user downloads: OBJ, MTL, textures, GLB, light probe."""
    folder = run_dir / "dmtet_mesh"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in DOWNLOAD_SUFFIXES)
