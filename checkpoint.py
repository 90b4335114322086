"""A run's checkpoint, `checkpoints/last.pt`: written atomically at save points, and the resume that
continues a run from it (docs/DESIGN.md, "Training loop").

Besides what the loop hands over (config, phase, optimizer, grad scaler, skipped steps) it holds
every rank's random streams, so a run resumed on as many processes draws the same cameras, time
steps and noise as an uninterrupted one, bit for bit.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

import distributed
import faults
from config import Config, resolve_path, resume_conflicts
from run_status import RunContext, TrainingError

CHECKPOINT_NAME = "last.pt"
PREVIOUS_CHECKPOINT_NAME = "previous.pt"   # a fresh run sets an earlier run's last.pt aside under this name

RngStreams = tuple[torch.Generator, torch.Generator]   # this rank's (camera, noise) generators
State = dict[str, Any]


def save_atomic(obj: Any, path: Path, before_replace: Callable[[], None] | None = None) -> None:
    """torch.save to a temporary file, then rename: a crash never leaves a half-written checkpoint,
    and an error while writing (a full disk) leaves no temporary file (`before_replace`: a test hook)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        torch.save(obj, tmp)
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def capture_rng(streams: RngStreams, device: torch.device) -> State:
    """This rank's random streams: its camera and noise generators, torch's CPU and CUDA states."""
    cam, noise = streams
    return {"cam": cam.get_state(), "noise": noise.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: State, streams: RngStreams, device: torch.device) -> None:
    cam, noise = streams
    cam.set_state(state["cam"].cpu())
    noise.set_state(state["noise"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


class Checkpoints:
    """The run folder's last.pt for one rank of the run `cfg`: every rank takes part in a save
    (its random streams) and a resume; rank 0 alone writes, keeps status.json and speaks."""

    def __init__(self, run_dir: Path, info: distributed.DistInfo, cfg: Config, streams: RngStreams,
                 context: RunContext) -> None:
        self.path = run_dir / "checkpoints" / CHECKPOINT_NAME
        self.info, self.cfg, self.streams, self.context = info, cfg, streams, context

    # -------------------------------------------------------------------------------- saving
    def gather_rng(self) -> list[State]:
        """Collective: every rank's random streams, in rank order (rank 0 writes them all)."""
        return distributed.gather_objects(capture_rng(self.streams, self.info.device), self.info)

    def write(self, it: int, contents: Callable[[], State], rng: list[State]) -> None:
        """Rank 0 writes `contents()` with the gathered streams; every rank records the checkpoint
        as the one an ending reports."""
        run = self.context.progress
        with self.context.signals.held():   # a checkpoint being written is finished, and recorded, first
            if self.info.is_main:
                run.activity = f"the checkpoint write of iteration {it}"
                state = {"it": it, **contents(), "rng": rng, "world_size": self.info.world_size}
                save_atomic(state, self.path, before_replace=lambda: faults.point("checkpoint", it))
            run.checkpoint_it, run.checkpoint_path = it, self.path
            self.context.status.write("running", run, f"checkpoint of iteration {it} saved")

    # -------------------------------------------------------------------------------- starting
    def start(self, spec: str | None, load: Callable[[State], None]) -> int:
        """The iteration the run starts from: a resume from `spec` ("auto": this folder's last.pt,
        or a path), else 0. resume=auto with no checkpoint yet starts over, as after an interrupt
        during the SDF pretraining."""
        if spec == "auto" and not self.path.is_file():
            self._say(f"resume=auto: no checkpoint in {self.path.parent} yet; starting from the beginning")
            spec = None
        if not spec:
            self.set_aside_earlier()
            return 0
        it = self.resume(spec, load)
        run = self.context.progress
        run.iteration = run.checkpoint_it = it
        run.checkpoint_path = self._resolve(spec)
        return it

    def resume(self, spec: str, load: Callable[[State], None]) -> int:
        """Check the checkpoint `spec`, hand it to `load` (model, optimizer, counters), then restore
        this rank's random streams; its iteration."""
        path = self._resolve(spec)
        if not path.is_file():
            raise TrainingError(f"resume: checkpoint not found: {path} "
                                f"({'no checkpoint in this run folder yet' if spec == 'auto' else 'check the path'})")
        state = torch.load(path, map_location=self.info.device, weights_only=False)
        conflicts = resume_conflicts(state["config"], self.cfg)
        if conflicts:
            raise TrainingError(f"resume: {path} was written by a run with {', '.join(conflicts)}; a resume keeps "
                                f"these keys: set them back, or start a new run (resume=null)")
        load(state)
        self._restore_streams(state["rng"])
        return int(state["it"])

    def _restore_streams(self, rngs: list[State]) -> None:
        if len(rngs) != self.info.world_size:
            warnings.warn(f"resume: checkpoint written by {len(rngs)} processes, running {self.info.world_size}; "
                          "random streams restart from the seed (the run continues, not bit-for-bit)")
            return
        restore_rng(rngs[self.info.rank], self.streams, self.info.device)

    def set_aside_earlier(self) -> None:
        """A fresh run in a folder that holds an earlier run's last.pt: keep it as previous.pt, so
        resume=auto never continues the earlier run after this one is interrupted before its
        first checkpoint (its log, cut back to nothing, would no longer match)."""
        if not (self.info.is_main and self.path.is_file()):
            return
        previous = self.path.with_name(PREVIOUS_CHECKPOINT_NAME)
        os.replace(self.path, previous)
        self._say(f"starting over: the earlier run's checkpoint is now {previous} (resume=auto continues a run)")

    def _resolve(self, spec: str) -> Path:
        return self.path if spec == "auto" else resolve_path(spec)

    def _say(self, line: str) -> None:
        if self.info.is_main:
            print(line, file=sys.stderr, flush=True)
