"""The training loop shared by both phases.

cameras -> phase.step (render + guidance) -> accumulate over camera-sector micro-steps ->
all-reduce gradients -> optimizer step; with progress, a JSON-lines log, validation images,
atomic checkpoints, exact resume, the final export, and an ending for every run: finished,
interrupted (SIGINT, SIGTERM) or failed, told in one line and in the run folder's status.json
(run_status.py).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

import distributed
import tb_log
import faults
import progress
from config import Config, resolve_path, write_json_atomic, write_text_atomic
from dataset.cameras import (CameraBatch, CameraOptions, azimuth_sector, sample_train_cameras,
                             turntable_cameras, validation_cameras)
from geometry.hashgrid import published_adamw
from run_status import (EXIT_ERROR, EXIT_OUT_OF_MEMORY, RunEnd, RunInterrupted, RunProgress, RunSignals, RunStatus,
                        failed, finished, stopped_at_once, stopped_between_steps)

CHECKPOINT_NAME = "last.pt"
PREVIOUS_CHECKPOINT_NAME = "previous.pt"   # a fresh run sets an earlier run's last.pt aside under this name


class TrainingError(RuntimeError):
    """A run cannot continue; the message says what happened and what to try."""


# ------------------------------------------------------------------------------------------------
# What a phase provides
# ------------------------------------------------------------------------------------------------
@dataclass
class StepResult:
    loss: torch.Tensor              # 0-dim; backward() puts the SDS gradient into the parameters
    sds: Any                        # the sd.SDSResult: its device-side stats are read one step later
    # The phase's values for the log (device tensors, or CPU tensors that go with them): read one
    # step later, so the host never waits for them, and turned into log entries by
    # phase.read_step. Taken from the last micro-step: they describe the step's parameters, which
    # micro-steps share.
    device_values: dict[str, torch.Tensor] = field(default_factory=dict)


class HostCopy:
    """Small tensors brought to host memory without stalling the stream.

    CUDA parts are copied into pinned memory asynchronously (queued after everything that produces
    them); ``tolist()`` waits for those copies only. Read one step later, they are long done, so the
    host never waits for the step it has just queued."""

    def __init__(self, parts: list[torch.Tensor]) -> None:
        self._parts: list[torch.Tensor] = []
        self._done = None
        for part in parts:
            part = part.detach().reshape(-1)
            if part.device.type == "cuda":
                host = torch.empty(part.shape, dtype=part.dtype, pin_memory=True)
                host.copy_(part, non_blocking=True)
                part, self._done = host, torch.cuda.Event()
            self._parts.append(part)
        if self._done is not None:
            self._done.record()

    def tolist(self) -> list[list[float]]:
        if self._done is not None:
            self._done.synchronize()
        return [p.tolist() for p in self._parts]


@dataclass
class QueuedStep:
    """A step whose work is queued on the device; its host values are read by Trainer.finish_step."""
    it: int
    stage: str
    ms: float                       # host time of the step (on CUDA, log() swaps in the device time)
    values: HostCopy                # [micro-steps, 2] SDS stats (non-finite, loss), the step tail,
    device_names: list[str]         # then the phase's device_values under these names


class Phase(Protocol):
    name: str
    lr: float
    prepare_activity: str           # what prepare() does, for the ending's "stopped during ..."

    def parameters(self) -> list[torch.nn.Parameter]: ...
    def stage(self, it: int) -> str: ...
    def prepare(self, resumed: bool) -> None: ...
    def step(self, it: int, cams: CameraBatch, generator: torch.Generator) -> StepResult: ...
    def read_step(self, it: int, values: dict[str, list[float]]) -> dict[str, float]: ...
    def validation_images(self, cams: CameraBatch) -> dict[str, np.ndarray]: ...
    def turntable_frames(self, cams: CameraBatch) -> np.ndarray: ...
    def export(self, out_dir: Path) -> list[Path]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def camera_options(cfg: Config, resolution: list[int] | None = None) -> CameraOptions:
    return CameraOptions(fovy_range=tuple(cfg.fovy_range), elevation_range=tuple(cfg.elevation_range),
                         camera_random_jitter=cfg.camera_random_jitter, cam_near_far=tuple(cfg.cam_near_far),
                         resolution=tuple(resolution or cfg.train_res), front_threshold=cfg.front_threshold)


def accumulation_plan(emulate_gpus: int | None, world_size: int) -> tuple[int, int]:
    """(virtual world size K, micro-steps per optimizer step) for `emulate_gpus` on W processes."""
    k = emulate_gpus or world_size
    if k < world_size or k % world_size:
        raise TrainingError(f"emulate_gpus={k} must be a multiple of the number of processes ({world_size}); "
                            f"use emulate_gpus={world_size * max(1, math.ceil(k / world_size))}")
    return k, k // world_size


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


def rewrite_log(path: Path, upto: int) -> None:
    """Keep the log's records of iterations 1..`upto` (where the run starts: the checkpoint's
    iteration, 0 when fresh), one per iteration, written back atomically. The run appends from
    there, so the log never holds an iteration twice, whatever an earlier run logged after its
    last checkpoint. A line cut short by a kill is dropped."""
    if not path.exists():
        return
    kept: dict[int, str] = {}
    for line in path.read_text().splitlines():
        try:
            it = json.loads(line).get("it")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(it, int) and 1 <= it <= upto:
            kept[it] = line                  # a later line of the same iteration replaces an earlier one
    write_text_atomic(path, "".join(kept[it] + "\n" for it in sorted(kept)))


def save_png(path: Path, image_hxwxc: np.ndarray) -> None:
    import imageio.v3 as iio
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image_hxwxc)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., C] floats in [0, 1] -> uint8 numpy."""
    return (images.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


@dataclass
class RunContext:
    """What a run's ending needs from the loop: the progress so far, status.json and the signals.
    Trainers built without one (tests, benchmarks) get a silent context."""
    progress: RunProgress
    status: RunStatus
    signals: RunSignals | None = None


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
class Trainer:
    # Consecutive skipped (non-finite) iterations after which the run stops with advice.
    MAX_CONSECUTIVE_SKIPS = 20

    def __init__(self, cfg: Config, info: distributed.DistInfo, phase: Phase, run_dir: Path,
                 generators: tuple[torch.Generator, torch.Generator], context: RunContext | None = None) -> None:
        self.cfg, self.info, self.phase, self.run_dir = cfg, info, phase, run_dir
        self.context = context or RunContext(RunProgress(cfg.iter), RunStatus(run_dir / "status.json"))
        self.cam_gen, self.noise_gen = generators
        self.virtual_world, self.micro_steps = accumulation_plan(cfg.emulate_gpus, info.world_size)
        self.params = phase.parameters()
        self.optimizer = published_adamw(self.params, phase.lr)
        # Mixed precision on CUDA (fp16 diffusion model) needs a grad scaler; fp32 on CPU needs none.
        self.scaler = torch.amp.GradScaler("cuda", enabled=info.device.type == "cuda")
        self.cam_opts = camera_options(cfg)
        # CUDA: cameras are copied on a high-priority side stream, so a phase can start work that
        # needs only the cameras (the appearance G-buffer) without queueing behind the last step.
        self.input_stream = (torch.cuda.Stream(info.device, priority=-1) if info.device.type == "cuda" else None)
        self.start_it = 0
        self.skipped_total = 0
        self.consecutive_skips = 0
        self.log_path = run_dir / "log.jsonl"
        self.tb = tb_log.open_for_run(cfg.tensorboard, run_dir, info.is_main)   # TensorBoard mirror of the run
        # CUDA timing: events of steps not yet logged, and the one log record held back until its
        # end event has passed (written by the next log() or flush_log()).
        self._step_events: dict[int, tuple[Any, Any]] = {}
        self._pending_record: dict[str, Any] | None = None
        if info.world_size * self.micro_steps < 4:
            warnings.warn(f"each optimizer step draws cameras from {info.world_size * self.micro_steps} sector "
                          f"draw(s), fewer than the 4 (front/left/back/right) the published multi-GPU runs "
                          f"covered every step; emulate_gpus=8 reproduces their 8 GPUs' views per step (fewer "
                          f"views slow appearance strategy 1 and can collapse thin parts: README, "
                          f"Troubleshooting), emulate_gpus=4 the sectors alone", stacklevel=2)

    # -------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / "checkpoints" / CHECKPOINT_NAME

    def _rng_state(self) -> dict[str, Any]:
        return {"cam": self.cam_gen.get_state(), "noise": self.noise_gen.get_state(),
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(self.info.device) if self.info.device.type == "cuda" else None}

    def save_checkpoint(self, it: int) -> None:
        # Collective: every rank contributes its RNG streams; rank 0 writes.
        rng = distributed.gather_objects(self._rng_state(), self.info)
        # The log first (CUDA holds the last record back): a run killed after this checkpoint still
        # has every iteration up to it in the log.
        self.flush_log()
        run = self.context.progress
        with self._signals_held():   # a checkpoint being written is finished, and recorded, first
            if self.info.is_main:
                run.activity = f"the checkpoint write of iteration {it}"
                save_atomic({"it": it, "config": self.cfg.to_dict(), "phase": self.phase.state_dict(),
                             "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                             "rng": rng, "world_size": self.info.world_size, "skipped_total": self.skipped_total},
                            self.checkpoint_path, before_replace=lambda: faults.point("checkpoint", it))
            run.checkpoint_it, run.checkpoint_path = it, self.checkpoint_path
            self.context.status.write("running", run, f"checkpoint of iteration {it} saved")

    def _start(self) -> None:
        """Resume (resume=auto with no checkpoint yet: start over, as after an interrupt during the
        SDF pretraining), or start fresh; then bring the log to the starting iteration."""
        spec = self.cfg.resume
        if spec == "auto" and not self.checkpoint_path.is_file():
            self._say(f"resume=auto: no checkpoint in {self.checkpoint_path.parent} yet; starting from the beginning")
            spec = None
        if spec:
            self.resume(spec)
            run = self.context.progress
            run.iteration = run.checkpoint_it = self.start_it
            run.checkpoint_path = self.checkpoint_path if spec == "auto" else resolve_path(spec)
        else:
            self._set_aside_earlier_checkpoint()
        if self.info.is_main:
            rewrite_log(self.log_path, self.start_it)
        self.context.status.write("running", self.context.progress,
                                  f"resumed at iteration {self.start_it}" if self.start_it else "started")

    def _set_aside_earlier_checkpoint(self) -> None:
        """A fresh run in a folder that holds an earlier run's last.pt: keep it as previous.pt, so
        resume=auto never continues the earlier run after this one is interrupted before its
        first checkpoint (its log, rewritten below, would no longer match)."""
        if not (self.info.is_main and self.checkpoint_path.is_file()):
            return
        previous = self.checkpoint_path.with_name(PREVIOUS_CHECKPOINT_NAME)
        os.replace(self.checkpoint_path, previous)
        self._say(f"starting over: the earlier run's checkpoint is now {previous} (resume=auto continues a run)")

    def _say(self, line: str) -> None:
        if self.info.is_main:
            print(line, file=sys.stderr, flush=True)

    def resume(self, spec: str) -> None:
        path = self.checkpoint_path if spec == "auto" else resolve_path(spec)
        if not path.is_file():
            raise TrainingError(f"resume: checkpoint not found: {path} "
                                f"({'no checkpoint in this run folder yet' if spec == 'auto' else 'check the path'})")
        state = torch.load(path, map_location=self.info.device, weights_only=False)
        if state["config"]["mode"] != self.cfg.mode:
            raise TrainingError(f"resume: {path} is a {state['config']['mode']} checkpoint, this run is {self.cfg.mode}")
        self.phase.load_state_dict(state["phase"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_it = int(state["it"])
        self.skipped_total = int(state.get("skipped_total", 0))
        rngs = state["rng"]
        if len(rngs) != self.info.world_size:
            warnings.warn(f"resume: checkpoint written by {len(rngs)} processes, running {self.info.world_size}; "
                          "random streams restart from the seed (the run continues, not bit-for-bit)")
            return
        mine = rngs[self.info.rank]
        self.cam_gen.set_state(mine["cam"].cpu())
        self.noise_gen.set_state(mine["noise"].cpu())
        torch.set_rng_state(mine["torch"].cpu())
        if mine["cuda"] is not None and self.info.device.type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"].cpu(), self.info.device)

    # -------------------------------------------------------------------------------- one step
    def _micro_step(self, it: int, j: int) -> tuple[StepResult, list[float]]:
        vrank = self.info.rank + self.info.world_size * j      # the rank this micro-step stands in for
        sector = azimuth_sector(vrank, self.virtual_world)
        cams = sample_train_cameras(self.cfg.batch, sector, self.cam_opts, self.cam_gen, self.info.device,
                                    stream=self.input_stream)
        # No autocast: geometry, rendering and the material run in fp32; the diffusion model holds
        # fp16 weights on CUDA and casts its inputs itself. The grad scaler protects that fp16 backward.
        result = self.phase.step(it, cams, self.noise_gen)
        # Always queued: non-finite SDS entries go in unmasked and _optimizer_step skips the update.
        # Mean over micro-steps, so K/W accumulated micro-steps equal one K-GPU step.
        self.scaler.scale(result.loss / self.micro_steps).backward()
        return result, list(cams.azimuth_deg_host)

    def _optimizer_step(self) -> None:
        """Apply the step unless a gradient is non-finite (sd's non-finite policy)."""
        if self.scaler.is_enabled():
            # CUDA: the grad scaler's inf/NaN check skips the update on the device (the fused AdamW
            # takes the flag as a tensor), so the host does not wait. Like any fp16 overflow, a
            # skipped step also halves the loss scale (it grows back after 2000 clean steps).
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None):
            self.optimizer.step()   # CPU: the same rule, checked on the host (no stream to stall)

    def _start_timer(self) -> Any:
        """CUDA events around the step instead of a device synchronize: the host runs ahead."""
        if self.info.device.type != "cuda":
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def train_step(self, it: int, stop_signal: int = 0) -> QueuedStep:
        """Queue one optimizer step (no host read on CUDA); ``finish_step`` gives its log record."""
        t0 = time.perf_counter()
        start_ev = self._start_timer()
        self.optimizer.zero_grad(set_to_none=True)
        results, azimuths = [], []
        for j in range(self.micro_steps):
            result, az_deg = self._micro_step(it, j)
            results.append(result)
            azimuths += az_deg
        # Sync point (several processes), the step's one collective: gradients averaged (a
        # non-finite entry on any rank reaches every rank, so all skip together), the stop flags
        # (SIGINT, SIGTERM) OR-ed and every rank's azimuths gathered for the log. Read one step
        # later, not here.
        flags = [stop_signal == signal.SIGINT, stop_signal == signal.SIGTERM]
        tail = distributed.step_all_reduce(self.params, flags, azimuths, self.info)
        self._optimizer_step()
        # No device synchronize: on CUDA, "ms" here is the host time of the step (the host waits
        # inside it, at the rasterizer, for the device); log() replaces it with the device time
        # between the step's CUDA events, read one step late.
        ms = (time.perf_counter() - t0) * 1000
        if start_ev is not None:
            end_ev = torch.cuda.Event(enable_timing=True)
            end_ev.record()
            self._step_events[it] = (start_ev, end_ev)
            for k in [k for k in self._step_events if k < it - 1]:   # never logged (e.g. a benchmark)
                del self._step_events[k]
        stats = torch.stack([r.sds.stats for r in results])            # [micro-steps, 2]
        dev = results[-1].device_values
        return QueuedStep(it, self.phase.stage(it), round(ms, 2), HostCopy([stats, tail, *dev.values()]), list(dev))

    def step_start_event(self, it: int) -> Any | None:
        """The CUDA event recorded when step `it` began; None on CPU, and once the step's record is
        logged (or two steps on, if it never is). Benchmarks time consecutive step starts with it."""
        events = self._step_events.get(it)
        return None if events is None else events[0]

    def finish_step(self, step: QueuedStep) -> dict[str, Any]:
        """The queued step's log record: loss, non-finite count, skipped, every rank's azimuths and
        "stop" (the signal that asked any rank to stop, SIGTERM first; 0: none). Raises TrainingError
        after too many skipped steps in a row."""
        stats, tail, *device_values = step.values.tolist()
        nonfinite, losses = int(sum(stats[0::2])), stats[1::2]
        (by_int, by_term), azimuths = distributed.split_tail(tail, 2, self.info.world_size)
        stop = int(signal.SIGTERM) if by_term else int(signal.SIGINT) if by_int else 0
        # First: the phase's own diagnosis (e.g. an empty surface) explains a bad step best.
        phase_entries = self.phase.read_step(step.it, dict(zip(step.device_names, device_values)))
        self._track_skips(step.it, nonfinite > 0, nonfinite)
        return {"it": step.it, "stage": step.stage, "loss": float(np.mean(losses)), "ms": step.ms,
                "nonfinite": nonfinite, "skipped": nonfinite > 0, "azimuth_deg": azimuths, "stop": stop,
                **phase_entries}

    def _track_skips(self, it: int, skipped: bool, nonfinite: int) -> None:
        if not skipped:
            self.consecutive_skips = 0
            return
        self.skipped_total += 1
        self.consecutive_skips += 1
        if self.info.is_main:
            print(f"\nwarning: iteration {it} ({self.phase.stage(it)}): {nonfinite} non-finite gradient entries; "
                  "step skipped", file=sys.stderr, flush=True)
        if self.consecutive_skips >= self.MAX_CONSECUTIVE_SKIPS:
            raise TrainingError(
                f"{self.consecutive_skips} consecutive iterations up to {it} ({self.phase.stage(it)} stage) had "
                "non-finite SDS gradients (NaN/inf). Try: a lower guidance_weight, a narrower time-step range, "
                "device=cpu to rule out fp16 overflow, or resume from the last checkpoint.")

    # -------------------------------------------------------------------------------- I/O (rank 0)
    def param_checksum(self) -> list[float]:
        """(sum, sum of squares) of all parameters in float64: equal on every rank iff in sync."""
        with torch.no_grad():
            flat = [p.detach().double().reshape(-1) for p in self.params]
            return [float(sum(f.sum() for f in flat)), float(sum((f * f).sum() for f in flat))]

    def log(self, record: dict[str, Any]) -> None:
        if record["it"] % self.cfg.save_interval == 0 or record["it"] == self.cfg.iter:
            # Collective, at save points only (cheap): every rank's parameter checksum, so the log
            # shows that all ranks hold identical parameters.
            record["param_checksum"] = distributed.gather_floats(self.param_checksum(), self.info)
        if self.info.device.type == "cuda":
            record["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(self.info.device) / 2**20, 1)
        if record["it"] not in self._step_events:  # CPU (or a record made elsewhere): write it now
            self._write_record(record)
            return
        # CUDA: hold this record back; the previous one's end event has passed by now (this step
        # waited for the device), so its device time is read without a synchronize.
        self.flush_log(wait=False)
        self._pending_record = record

    def flush_log(self, wait: bool = True) -> None:
        """Write the held-back record with its step's device time (waits for it when `wait`)."""
        record, self._pending_record = self._pending_record, None
        if record is None:
            return
        start, end = self._step_events.pop(record["it"], (None, None))
        if end is not None and (wait or end.query()):
            end.synchronize()
            record["ms"] = round(start.elapsed_time(end), 2)
        self._write_record(record)

    def _write_record(self, record: dict[str, Any]) -> None:
        if self.info.is_main:
            with self.log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.tb.log_scalars(record["it"], record)

    def validate(self, it: int) -> None:
        if not (self.info.is_main and self.cfg.validate):
            return
        res = self.cfg.display_res or self.cfg.train_res
        cams = validation_cameras(camera_options(self.cfg, res), self.info.device, n=4)
        with torch.no_grad():
            images = self.phase.validation_images(cams)
        for name, views in images.items():  # views: [4, H, W, C] uint8 -> one strip
            save_png(self.run_dir / "validation" / f"it{it:06d}_{name}.png", np.concatenate(list(views), axis=1))
        self.tb.log_validation(it, images)

    def write_video(self) -> None:
        if not (self.info.is_main and self.cfg.validate and self.cfg.video_frames > 0):
            return
        import imageio.v2 as iio2
        res = self.cfg.display_res or self.cfg.train_res
        cams = turntable_cameras(camera_options(self.cfg, res), self.info.device, self.cfg.video_frames)
        self.context.progress.activity = "the turntable video"
        with torch.no_grad():
            frames = self.phase.turntable_frames(cams)  # [N, H, W, 3] uint8
        self.tb.log_turntable(self.cfg.iter, frames)
        tmp = self.run_dir / "video.tmp.mp4"
        # The ffmpeg writer by name: with imageio-ffmpeg missing, imageio would otherwise try another
        # plugin for ".mp4" (tifffile) and fail with an unrelated TypeError (check_video_writer
        # refuses such a run before training). H.264 wants even sizes; macro_block_size=1 keeps ours.
        try:
            iio2.mimwrite(tmp, list(frames), format="FFMPEG", fps=30, macro_block_size=1)
        except BaseException:
            tmp.unlink(missing_ok=True)   # no partial file left behind
            raise
        os.replace(tmp, self.run_dir / "video.mp4")

    # -------------------------------------------------------------------------------- main
    def fit(self) -> RunEnd:
        """The run from here to its end: prepare, train, export; how it ended (a failure raises)."""
        self._start()
        run = self.context.progress
        resumed = self.start_it > 0
        run.activity = "preparation" if resumed else self.phase.prepare_activity
        self.phase.prepare(resumed=resumed)
        distributed.broadcast_params(self.params, self.info)  # sync point: identical start on every rank
        bar = progress.bar(self.cfg.iter, self.phase.name, initial=self.start_it, show_at_once=True)
        try:
            it, stop = self._loop(bar)
        finally:
            bar.close()   # ends the bar's line, also when an error (printed next) leaves the loop
        if stop != signal.SIGTERM:   # SIGTERM: the job is about to be killed; the resumed run exports
            self._export(it)
        distributed.barrier(self.info)  # sync point: no rank exits while rank 0 still writes
        self.tb.close()
        if stop == signal.SIGTERM or (stop and it < self.cfg.iter):   # else all work is done
            return stopped_between_steps(stop, run)
        return finished(run)

    def _export(self, it: int) -> None:
        """Rank 0: the mesh, and the video once the last iteration is reached."""
        if not self.info.is_main:
            return
        run = self.context.progress
        run.activity = "the export"
        faults.point("export", 1)
        out = self.run_dir / "dmtet_mesh"
        exported = self.phase.export(out)
        run.export_dir = out
        print(f"exported: {', '.join(str(p) for p in exported)}", flush=True)
        self.tb.log_mesh(it, exported)
        if it == self.cfg.iter:
            self.write_video()

    def _loop(self, bar: Any) -> tuple[int, int]:
        """Train from start_it to cfg.iter or a requested stop; returns the last iteration and the
        signal that stopped the loop early (0: none)."""
        cfg, run = self.cfg, self.context.progress
        it, queued, stop = self.start_it, None, 0
        with self._stopping_at_steps(), _flushing(self):
            while it < cfg.iter:
                it += 1
                run.activity = f"training iteration {it} ({self.phase.stage(it)} stage)"
                faults.point("train", it)
                step = self.train_step(it, stop_signal=self._stop_requested())
                # The previous step is read now, while this one runs on the device: the host never
                # waits for the step it has just queued. All ranks read the same OR-ed stop flags,
                # so they all stop after this step.
                if queued is not None:
                    stop = self._report(queued, bar)
                queued = step
                save_point = it % cfg.save_interval == 0 or it == cfg.iter
                if save_point or stop:
                    stop = self._report(queued, bar) or stop   # checkpoints need this step's values
                    queued = None
                    if save_point:
                        self.validate(it)
                    self.save_checkpoint(it)
                if stop:
                    break
        return it, stop

    def _stopping_at_steps(self) -> Any:
        signals = self.context.signals
        return signals.stopping_at_steps() if signals is not None else contextlib.nullcontext()

    def _signals_held(self) -> Any:
        signals = self.context.signals
        return signals.held() if signals is not None else contextlib.nullcontext()

    def _stop_requested(self) -> int:
        signals = self.context.signals
        return signals.requested if signals is not None else 0

    def _report(self, step: QueuedStep, bar: Any) -> int:
        """Log a queued step's record and advance the progress bar; the signal that asks the run to
        stop after it (0: none)."""
        record = self.finish_step(step)
        stop = record.pop("stop")
        self.log(record)
        self.context.progress.iteration = record["it"]
        self._update_progress(bar, record)
        return stop

    def _update_progress(self, bar: Any, record: dict[str, Any]) -> None:
        post = {"stage": record["stage"], "loss": f"{record['loss']:.4g}"}
        if "peak_mem_mb" in record:
            post["mem"] = f"{record['peak_mem_mb'] / 1024:.1f}G"
        if self.skipped_total:
            post["skipped"] = self.skipped_total
        bar.set_postfix(post, refresh=False)
        bar.update(1)


@contextlib.contextmanager
def _flushing(trainer: Trainer):
    """Write the held-back log record when the loop ends, also when it ends with an error."""
    try:
        yield
    finally:
        trainer.flush_log()


# ------------------------------------------------------------------------------------------------
# Entry point used by train.py
# ------------------------------------------------------------------------------------------------
def make_generators(seed: int, info: distributed.DistInfo) -> tuple[torch.Generator, torch.Generator]:
    """Per-rank streams: cameras on CPU (cheap, device-independent), noise/timesteps on the device."""
    cam = torch.Generator(device="cpu").manual_seed(seed + info.rank)
    noise = torch.Generator(device=info.device).manual_seed(seed + 1_000_003 * (info.rank + 1))
    return cam, noise


def check_video_writer(cfg: Config) -> None:
    """Fail before training, not after it, when the final turntable video cannot be written."""
    if not (cfg.validate and cfg.video_frames > 0):
        return
    try:
        import imageio_ffmpeg  # noqa: F401  the ffmpeg binary imageio's FFMPEG writer uses
    except ImportError as e:
        raise TrainingError(f"video_frames={cfg.video_frames} needs the imageio-ffmpeg package to write video.mp4 "
                            f"({e}); install it (pip install imageio-ffmpeg) or set video_frames=0") from e


def run(cfg: Config, config_path: str | None = None) -> int:
    """Train and export; every ending is one line on stderr, status.json and an exit code
    (run_status.py)."""
    try:
        info = distributed.setup(cfg.device)
    except (distributed.DeviceError, distributed.PeerFailure) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    progress.configure(enabled=info.is_main)
    run_dir = cfg.run_dir(config_path)
    context = RunContext(RunProgress(cfg.iter), RunStatus(run_dir / "status.json"), RunSignals(info.is_main))
    try:
        with _deterministic_on_cpu(info.device), context.signals:
            try:
                end = _train(cfg, info, run_dir, context)
            except BaseException as e:
                context.signals.ending = True
                end = _failure_end(e, cfg, info, context)
                if end is None:        # not one of ours: a bug, whose traceback is wanted
                    context.status.write("failed", context.progress, f"{type(e).__name__}: {e}", EXIT_ERROR)
                    raise
            context.signals.ending = True
            _report_end(end, info, context)
    finally:
        distributed.teardown()
    return end.exit_code


def _train(cfg: Config, info: distributed.DistInfo, run_dir: Path, context: RunContext) -> RunEnd:
    from phases import build_phase  # heavy imports only when training
    check_video_writer(cfg)
    if info.is_main:
        write_json_atomic(run_dir / "config.json", cfg.to_dict())
        context.status.enabled = True
    context.progress.activity = "model loading"
    context.status.write("running", context.progress, "started")
    distributed.barrier(info)  # sync point: the run folder exists before any rank uses it
    torch.manual_seed(cfg.seed)  # same network initialization on every rank
    generators = make_generators(cfg.seed, info)
    phase = build_phase(cfg, info, run_dir)
    return Trainer(cfg, info, phase, run_dir, generators, context).fit()


def _failure_end(e: BaseException, cfg: Config, info: distributed.DistInfo, context: RunContext) -> RunEnd | None:
    """How an exception ends the run; None for an unexpected one (a bug: re-raised)."""
    from phases import user_errors
    run = context.progress
    if isinstance(e, RunInterrupted):
        return stopped_at_once(e.signum, run)
    if isinstance(e, KeyboardInterrupt):       # SIGINT where no handler could be installed
        return stopped_at_once(signal.SIGINT, run)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return failed(out_of_memory_message(cfg, info, run), run, EXIT_OUT_OF_MEMORY, resumable=True)
    if isinstance(e, distributed.PeerFailure):
        return failed(str(e), run, resumable=True, root_cause=False)
    if isinstance(e, (TrainingError, *user_errors())):
        return failed(str(e), run)
    return None


def _report_end(end: RunEnd, info: distributed.DistInfo, context: RunContext) -> None:
    """The one line (stderr), status.json (rank 0) and, for torchrun, the failing process's cause.

    An interrupt reaches every process alike and rank 0 tells it; a failure may be one rank's
    own, so that rank tells it, naming itself when there are several."""
    context.status.write(end.state, context.progress, end.message, end.exit_code, end.signum)
    if end.state == "finished":
        return
    if end.state == "interrupted":
        if info.is_main:
            print(end.message, file=sys.stderr, flush=True)
        return
    where = f" (rank {info.rank} of {info.world_size})" if info.distributed else ""
    # Several processes: a new line, since rank 0's progress bar may hold the current one.
    print(f"{chr(10) if info.distributed else ''}error{where}: {end.message}", file=sys.stderr, flush=True)
    if end.root_cause:   # torchrun names the earliest report the root cause: the peers must not race it
        distributed.report_failure(f"error{where}: {end.message}")


def out_of_memory_message(cfg: Config, info: distributed.DistInfo, run: RunProgress) -> str:
    """What ran out of GPU memory, with what sizes, and which keys shrink it."""
    geometry = cfg.mode == "geometry_modeling"
    sizes = f"batch {cfg.batch} per process, train_res {list(cfg.train_res)}, " + (
        f"dmtet_grid {cfg.dmtet_grid}" if geometry else f"texture_res {list(cfg.texture_res)}")
    third = "dmtet_grid (256 -> 128)" if geometry else "texture_res (the bake at the end)"
    return (f"out of GPU memory during {run.activity} ({sizes}; {gpu_memory_in_use(info.device)}). Lower batch, "
            f"train_res (e.g. [256,256]) or {third}; half the batch with twice the emulate_gpus keeps the "
            f"cameras per step")


def gpu_memory_in_use(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return "GPU memory in use: unknown, not a CUDA device"
    try:
        free, total = torch.cuda.mem_get_info(device)
        allocated, reserved = torch.cuda.memory_allocated(device), torch.cuda.memory_reserved(device)
    except RuntimeError as e:
        return f"GPU memory in use: unknown ({e})"
    gib = 2 ** 30
    return (f"GPU memory in use: {(total - free) / gib:.1f} of {total / gib:.1f} GiB, PyTorch "
            f"{allocated / gib:.1f} GiB allocated, {reserved / gib:.1f} GiB reserved")


@contextlib.contextmanager
def _deterministic_on_cpu(device: torch.device):
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    if device.type == "cpu":
        # The hash-grid backward accumulates rows with index_put_(accumulate=True), whose CPU kernel
        # is run-to-run nondeterministic unless deterministic mode is on (free on CPU). Without it
        # neither two identical runs nor a resumed run match bit for bit.
        torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
