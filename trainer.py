"""The training loop shared by both phases.

cameras -> phase.step (render + guidance) -> accumulate over camera-sector micro-steps ->
all-reduce gradients -> optimizer step; with progress, the run's log (run_log.py), validation
images, atomic checkpoints and exact resume (checkpoint.py), the final export, and an ending for
every run: finished, interrupted (SIGINT, SIGTERM) or failed, told in one line and in the run
folder's status.json (run_status.py).
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imageio.v2 as iio2
import imageio.v3 as iio
import numpy as np
import torch

import distributed
import faults
import progress
from checkpoint import Checkpoints, State
from config import Config, write_json_atomic
from dataset.cameras import (CameraOptions, azimuth_sector, sample_train_cameras,
                             turntable_cameras, validation_cameras)
from geometry.hashgrid import published_adamw
from phases import USER_ERRORS, build_phase
from phases.base import Phase, StepResult
from run_log import RunLog
from run_status import (EXIT_ERROR, EXIT_OUT_OF_MEMORY, RunContext, RunEnd, RunInterrupted, RunProgress, RunSignals,
                        RunStatus, TrainingError, failed, finished, stopped_at_once, stopped_between_steps)

# The ffmpeg binary imageio's FFMPEG writer uses for video.mp4: optional, as a run with
# video_frames=0 needs none; check_video_writer refuses a run that needs it, with this error.
try:
    import imageio_ffmpeg  # noqa: F401
    FFMPEG_IMPORT_ERROR: ImportError | None = None
except ImportError as e:
    FFMPEG_IMPORT_ERROR = e


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


def save_png(path: Path, image_hxwxc: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image_hxwxc)


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
        self.checkpoints = Checkpoints(run_dir, info, cfg, generators, self.context)
        self.run_log = RunLog(cfg, info, run_dir, self.params)
        self.tb = self.run_log.tb   # validation images, the mesh and the video join the log's scalars
        if info.world_size * self.micro_steps < 4:
            warnings.warn(f"each optimizer step draws cameras from {info.world_size * self.micro_steps} sector "
                          f"draw(s), fewer than the 4 (front/left/back/right) the published multi-GPU runs "
                          f"covered every step; emulate_gpus=8 reproduces their 8 GPUs' views per step (fewer "
                          f"views slow appearance strategy 1 and can collapse thin parts: README, "
                          f"Troubleshooting), emulate_gpus=4 the sectors alone", stacklevel=2)

    # -------------------------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoints.path

    def save_checkpoint(self, it: int) -> None:
        """Collective: every rank contributes its random streams; rank 0 writes last.pt."""
        rng = self.checkpoints.gather_rng()
        # The log first (CUDA holds the last record back): a run killed after this checkpoint still
        # has every iteration up to it in the log.
        self.run_log.flush()
        self.checkpoints.write(it, self._state, rng)

    def _state(self) -> State:
        """What a checkpoint holds of the run besides its iteration and random streams."""
        return {"config": self.cfg.to_dict(), "phase": self.phase.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scaler": self.scaler.state_dict(),
                "skipped_total": self.skipped_total}

    def _load_state(self, state: State) -> None:
        self.phase.load_state_dict(state["phase"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.skipped_total = int(state.get("skipped_total", 0))

    def _start(self) -> None:
        """Resume or start fresh (checkpoint.py), then bring the log to the starting iteration."""
        self.start_it = self.checkpoints.start(self.cfg.resume, self._load_state)
        self.run_log.cut_back(self.start_it)
        self.context.status.write("running", self.context.progress,
                                  f"resumed at iteration {self.start_it}" if self.start_it else "started")

    def resume(self, spec: str) -> None:
        """Continue from the checkpoint `spec` ("auto": this run folder's, or a path)."""
        self.start_it = self.checkpoints.resume(spec, self._load_state)

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

    def train_step(self, it: int, stop_signal: int = 0) -> QueuedStep:
        """Queue one optimizer step (no host read on CUDA); ``finish_step`` gives its log record."""
        t0 = time.perf_counter()
        timer = self.run_log.start_timer()
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
        self.run_log.end_timer(it, timer)
        stats = torch.stack([r.sds.stats for r in results])            # [micro-steps, 2]
        dev = results[-1].device_values
        return QueuedStep(it, self.phase.stage(it), round(ms, 2), HostCopy([stats, tail, *dev.values()]), list(dev))

    def step_start_event(self, it: int) -> Any | None:
        """The CUDA event recorded when step `it` began (None on CPU): benchmarks time from it."""
        return self.run_log.step_start_event(it)

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

    # -------------------------------------------------------------------------------- the log
    # -------------------------------------------------------------------------------- images (rank 0)
    def validate(self, it: int) -> None:
        if not (self.info.is_main and self.cfg.validate):
            return
        self.context.progress.activity = f"validation of iteration {it}"
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
        with self.context.signals.stopping_at_steps(), self.run_log.flushed_at_end():
            while it < cfg.iter:
                it += 1
                run.activity = f"training iteration {it} ({self.phase.stage(it)} stage)"
                faults.point("train", it)
                step = self.train_step(it, stop_signal=self.context.signals.requested)
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

    def _report(self, step: QueuedStep, bar: Any) -> int:
        """Log a queued step's record and advance the progress bar; the signal that asks the run to
        stop after it (0: none)."""
        record = self.finish_step(step)
        stop = record.pop("stop")
        self.run_log.log(record)
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
    missing = FFMPEG_IMPORT_ERROR
    if missing is not None:
        raise TrainingError(f"video_frames={cfg.video_frames} needs the imageio-ffmpeg package to write video.mp4 "
                            f"({missing}); install it (pip install imageio-ffmpeg) or set video_frames=0") from missing


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
    run = context.progress
    if isinstance(e, RunInterrupted):
        return stopped_at_once(e.signum, run)
    if isinstance(e, KeyboardInterrupt):       # SIGINT where no handler could be installed
        return stopped_at_once(signal.SIGINT, run)
    if isinstance(e, torch.cuda.OutOfMemoryError):
        return failed(out_of_memory_message(cfg, info, run), run, EXIT_OUT_OF_MEMORY, resumable=True)
    if isinstance(e, distributed.PeerFailure):
        return failed(str(e), run, resumable=True, root_cause=False)
    if isinstance(e, USER_ERRORS):
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
