"""Per-iteration speed of a config's stage against the diffusion floor (full-size SD 2.1-base shapes).

    python scripts/bench.py --config configs/car_geometry.json --stage coarse --out /tmp/coarse.json
    python scripts/bench.py --config configs/car_appearance_strategy0.json --stage appearance dmtet_grid=256

Builds the SD 2.1-base architecture with random weights (no download; cached under --sd-model),
runs the real training step of the stage (trainer.Trainer.train_step) and reports, in one process:
ms per iteration (wall time of consecutive steps between two device syncs; on CUDA also the median
step, from the device time between consecutive steps' start events); the floor = the same
diffusion calls alone at the same batch, made exactly as the pipeline makes them (coarse: the CFG UNet
forward on 64x64 latents; fine/appearance: VAE encode forward+backward at 512^2 plus the UNet); their
ratio; with the UNet replayed from a CUDA graph or the calls compiled (config keys unet_cuda_graph,
diffusion_compile, followed as in training), also the floor of the plain diffusers calls
(``eager_floor_ms_median``; ``floor_to_eager_floor`` is what graphs and compilation gain on the calls
alone, ``ratio_median_to_eager_floor`` the step against them) and the seconds each compile took;
a breakdown of one step (geometry network, marching tets, rasterization + shading, guidance,
backward, optimizer); and peak GPU memory. key=value overrides as in train.py. ``--profile DIR``
adds per-step device-busy time, kernel launches, syncs, where the host waited for the device
(``host_waits_ms_per_step``: by this repository's innermost function around each blocking call) and
what the idle device waited for (``device_idle_by_host_frame_ms_per_step``: each gap charged to the
host code that launched the work ending it). ``--frozen`` sets the learning rate to 0: the same work
per step on the initial surface, which random guidance would otherwise reshape differently in every
run (the result's ``faces_median``).
"""
from __future__ import annotations

import argparse
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import trimesh  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import distributed  # noqa: E402
from config import load_config, resolve_path  # noqa: E402
from dataset.cameras import azimuth_sector, sample_train_cameras  # noqa: E402
from geometry.marching_tets import marching_tets  # noqa: E402
from phases import build_phase  # noqa: E402
from scripts.make_tiny_sd import build_tiny_sd  # noqa: E402
from sd import CudaGraphUNet  # noqa: E402
from trainer import Trainer, make_generators  # noqa: E402


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> list[float]:
    """ms per call, synchronizing the device around each call."""
    out = []
    for i in range(warmup + iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            out.append((time.perf_counter() - t0) * 1000)
    return out


def bench_mesh(folder: Path) -> Path:
    """A 20k-face UV-mapped sphere for appearance benchmarks when the config's base_mesh is absent."""
    path = folder / "bench_sphere.obj"
    if not path.exists():
        trimesh.creation.icosphere(subdivisions=5, radius=0.8).export(path)
    return path


def stage_overrides(stage: str, cfg_mode: str, tmp: Path, base_mesh_exists: bool) -> list[str]:
    if stage == "appearance":
        if cfg_mode != "appearance_modeling":
            raise SystemExit("--stage appearance needs an appearance config")
        return [] if base_mesh_exists else [f"base_mesh={bench_mesh(tmp)}"]
    if cfg_mode != "geometry_modeling":
        raise SystemExit(f"--stage {stage} needs a geometry config")
    return ["coarse_iter=1000000", "iter=1000000"] if stage == "coarse" else ["coarse_iter=0"]


def floor_fn(phase, stage: str, batch: int, device: torch.device) -> Callable[[], None]:
    """The diffusion calls of one step alone, on random inputs of the step's shapes."""
    return diffusion_calls(phase.guide.model, stage, batch, device)


def diffusion_calls(sd, stage: str, batch: int, device: torch.device) -> Callable[[], None]:
    """The diffusion calls of one step of `stage` (coarse, fine, appearance) with the guidance model
    `sd` (sd.StableDiffusionGuidance), made as the step makes them: coarse, the CFG UNet forward on
    latents [B, 4, R/8, R/8]; fine and appearance, the VAE encoder forward at R^2 (R =
    image_resolution), the UNet, and the VAE encoder backward. Inputs random, of the step's shapes."""
    gen = torch.Generator(device=device).manual_seed(0)
    view = torch.zeros(batch, dtype=torch.int64, device=device)
    t = torch.full((batch,), 500, dtype=torch.int64, device=device)
    emb, neg_weights = sd.text_embeddings(view, batch), None
    if sd.opts.perp_neg:   # the step's UNet call: 4B rows (uncond, blended view prompt, two negatives)
        emb, neg_weights = sd.perp_neg_embeddings(torch.zeros(batch, device=device), batch)
    if stage == "coarse":
        z = torch.randn(sd.latent_shape(batch), device=device)
        return lambda: sd.predict_eps(z, t, emb, neg_weights)
    res = sd.opts.image_resolution
    imgs = torch.rand(batch, 3, res, res, device=device, requires_grad=True)

    def call() -> None:
        lat = sd.encode_images(imgs, gen)
        eps = sd.predict_eps(lat.detach().float(), t, emb, neg_weights)
        (lat.float() * eps).sum().backward()
    return call


def breakdown(phase, trainer, stage: str, device: torch.device, iters: int) -> dict[str, float]:
    """Median ms of each part of one step, each timed alone with device syncs around it."""
    cams = sample_train_cameras(trainer.cfg.batch, azimuth_sector(0, 1), trainer.cam_opts, trainer.cam_gen, device)
    gen = trainer.noise_gen
    parts: dict[str, Callable[[], object]] = {}
    if stage in ("coarse", "fine"):
        geo = phase.geo
        sdf, deform = geo.sdf_and_deform()
        verts_g = geo.deformed_verts(deform)
        # Rendered from the padded surface, as in training: the same shapes reuse the step's CUDA
        # graph of the ops after the rasterizer (render_cuda_graph) instead of capturing another.
        surf = geo.extract_padded()
        verts, faces = surf.verts, surf.faces
        name = "geometry_coarse" if stage == "coarse" else "geometry_fine"
        spec = phase.guide.stage_input(name)
        x = phase.render(verts, faces, cams, spec)
        parts["geometry network fwd"] = lambda: geo.sdf_and_deform()
        parts["marching tets"] = lambda: marching_tets(verts_g, sdf, geo.tets, geo.topology)
        parts["rasterization + normals"] = lambda: phase.render(verts, faces, cams, spec)
    else:
        name = "appearance"
        x = phase._render(cams).permute(0, 3, 1, 2).contiguous()
        parts["rasterization + shading"] = lambda: phase._render(cams)
    xd = x.detach().requires_grad_(True)
    parts["guidance (sds fwd + VAE bwd)"] = lambda: phase.guide.sds(xd, name, 1, cams, gen).loss.backward()
    parts["optimizer step"] = lambda: trainer.optimizer.step()
    return {k: round(statistics.median(timed(fn, device, iters, 2)), 3) for k, fn in parts.items()}


def run_steps(trainer, first_it: int, n: int, starts: list | None = None,
              records: list | None = None) -> list[float]:
    """Steps first_it.. as Trainer.fit runs them (each step's record read while the next one is
    queued); the host ms of each step. `starts` (CUDA): receives each step's start event;
    `records`: each step's log record."""
    host_ms, queued = [], None

    def finish(step) -> None:
        record = trainer.finish_step(step)
        if records is not None:
            records.append(record)
    for it in range(first_it, first_it + n):
        step = trainer.train_step(it)
        start = trainer.step_start_event(it)
        if starts is not None and start is not None:
            starts.append(start)
        if queued is not None:
            finish(queued)
        queued = step
        host_ms.append(step.ms)
    if queued is not None:
        finish(queued)
    return host_ms


def device_periods_ms(starts: list) -> list[float]:
    """Device time between consecutive steps' start events (call after a synchronize): one value
    per step, no synchronization between steps needed to take it."""
    return [a.elapsed_time(b) for a, b in zip(starts, starts[1:])]


# Runtime calls during which the host can block on the device: syncs, and copies that wait for the
# stream (device->host, or from pageable memory).
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
MEMCPY_CALLS = ("cudaMemcpyAsync", "cudaMemcpy")
WAIT_CALLS = SYNC_CALLS + MEMCPY_CALLS


def innermost_own_frames(events: list[dict], own_files: set[str], spans: list[dict]) -> list[str | None]:
    """For each host span (an event with "tid", "ts", "dur"), the innermost Python frame of this
    repository around it on the same thread, or None. The trace must be recorded with
    ``with_stack=True``: frames are named "path.py(line): function", path relative to the import
    root, so ``own_files`` holds the repository's .py paths. Frames of one thread nest, so one sweep
    per thread with a stack of open frames finds them all; spans of one thread do not overlap."""
    frames: dict[object, list[dict]] = {}
    for e in events:
        if e.get("ph") == "X" and e.get("cat") == "python_function" and e["name"].split("(")[0] in own_files:
            frames.setdefault(e.get("tid"), []).append(e)
    for fs in frames.values():
        fs.sort(key=lambda f: (f["ts"], -f["dur"]))
    found: list[str | None] = [None] * len(spans)
    order = sorted(range(len(spans)), key=lambda i: spans[i]["ts"])
    state: dict[object, tuple[int, list[dict]]] = {}
    for i in order:
        span = spans[i]
        fs = frames.get(span.get("tid"), [])
        ptr, stack = state.get(span.get("tid"), (0, []))
        while ptr < len(fs) and fs[ptr]["ts"] <= span["ts"]:
            f = fs[ptr]
            while stack and stack[-1]["ts"] + stack[-1]["dur"] < f["ts"]:
                stack.pop()
            stack.append(f)
            ptr += 1
        while stack and stack[-1]["ts"] + stack[-1]["dur"] < span["ts"] + span["dur"]:
            stack.pop()
        state[span.get("tid")] = (ptr, stack)
        found[i] = stack[-1]["name"] if stack else None
    return found


def blocking_waits(events: list[dict], steps: int, own_files: set[str], min_us: float = 100.0) -> dict[str, float]:
    """Where the host waited for the device: ms per step of each blocking runtime call lasting at
    least ``min_us``, by the innermost frame of this repository around it (innermost_own_frames).
    Calls outside any own frame are listed under the runtime call's name."""
    calls = [e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
             and e["name"] in WAIT_CALLS and e["dur"] >= min_us]
    waited: dict[str, float] = {}
    for call, where in zip(calls, innermost_own_frames(events, own_files, calls)):
        where = where or call["name"]
        waited[where] = waited.get(where, 0.0) + call["dur"] / 1000 / steps
    return _rounded_by_size(waited)


DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def device_idle(events: list[dict], steps: int, own_files: set[str], min_us: float = 5.0
                ) -> tuple[float, dict[str, float]]:
    """(ms per step the device sat idle, that idle by where the host was): every gap of at least
    ``min_us`` between device activities (kernels, copies, memsets; overlaps merged) is charged to
    the innermost own frame around the launch of the activity that ends it, i.e. the host code the
    device was waiting for. Gaps before the first and after the last activity are not counted."""
    acts = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("ph") == "X" and e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {})}
    gaps: list[tuple[float, dict]] = []            # (idle us, the activity that ends the gap)
    busy_until = acts[0]["ts"] + acts[0]["dur"] if acts else 0.0
    for act in acts[1:]:
        if act["ts"] - busy_until >= min_us:
            gaps.append((act["ts"] - busy_until, act))
        busy_until = max(busy_until, act["ts"] + act["dur"])
    ended_by = [launches.get(act.get("args", {}).get("correlation")) for _, act in gaps]
    known = [launch for launch in ended_by if launch is not None]
    frames = iter(innermost_own_frames(events, own_files, known))
    idle: dict[str, float] = {}
    for (gap, act), launch in zip(gaps, ended_by):
        where = (next(frames) or launch["name"]) if launch is not None else act["name"]
        idle[where] = idle.get(where, 0.0) + gap / 1000 / steps
    return round(sum(idle.values()), 3), _rounded_by_size(idle)


def _rounded_by_size(ms: dict[str, float], keep: int = 25) -> dict[str, float]:
    top = sorted(ms.items(), key=lambda kv: -kv[1])[:keep]
    return {k: round(v, 3) for k, v in top}


def profile_steps(trainer, it0: int, steps: int, out_dir: Path) -> dict[str, float]:
    """torch.profiler over `steps` training steps: where the time goes, per step.

    Writes the operator tables (by host time and by device time) and a gzipped Chrome trace to
    ``out_dir``; returns per-step device-kernel time, kernel launches and host<->device syncs. A GPU
    busy for much less than the wall time means the host (Python, launches, syncs) is the limit.
    The profiled wall time includes the profiler's own host cost (stacks are recorded for the host
    waits), so compare it with other profiled runs, not with ``iteration_ms``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        t0 = time.perf_counter()
        run_steps(trainer, it0, steps)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - t0) * 1000 / steps
    events = prof.key_averages()
    for key in ("self_cpu_time_total", "self_device_time_total"):
        (out_dir / f"ops_by_{key}.txt").write_text(events.table(sort_by=key, row_limit=60))
    trace = out_dir / "trace.json.gz"
    prof.export_chrome_trace(str(trace))   # a .gz path is written gzipped
    own = {str(p.relative_to(REPO)) for p in REPO.rglob("*.py")}
    with gzip.open(trace, "rt") as f:
        trace_events = json.load(f)["traceEvents"]
    waits = blocking_waits(trace_events, steps, own)
    idle_ms, idle_where = device_idle(trace_events, steps, own)

    def count(names: tuple[str, ...]) -> int:
        return sum(e.count for e in events if e.key in names)
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    return {"profiled_wall_ms_per_step": round(wall_ms, 3),
            "device_busy_ms_per_step": round(kernel_us / 1000 / steps, 3),
            "kernel_launches_per_step": count(("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                               "cuLaunchKernelEx")) / steps,
            "syncs_per_step": count(SYNC_CALLS) / steps,
            "memcpy_calls_per_step": count(MEMCPY_CALLS) / steps,
            "host_waits_ms_per_step": waits,
            "device_idle_ms_per_step": idle_ms, "device_idle_by_host_frame_ms_per_step": idle_where}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--stage", choices=("coarse", "fine", "appearance"), required=True)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--sd-model", default=str(Path(tempfile.gettempdir()) / "sd21_base_random"),
                    help="SD 2.1-base-shaped model folder (built with random weights if missing)")
    ap.add_argument("--out", default=None, help="JSON output path")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also profile 5 steps (CUDA only): operator tables and a trace into DIR")
    ap.add_argument("--frozen", action="store_true",
                    help="learning rate 0: the same work per step, but the geometry keeps its initial surface "
                         "(the random-weight guidance otherwise shrinks it to a few thousand faces)")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)

    sd_dir = Path(args.sd_model)
    if not (sd_dir / "model_index.json").exists():
        build_tiny_sd(sd_dir, full_size=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench_"))
    base = load_config(args.config, args.overrides)
    has_mesh = bool(base.base_mesh) and resolve_path(base.base_mesh).is_file()
    overrides = [*args.overrides, f"sd_model={sd_dir}", "validate=false", f"out_dir={tmp / 'run'}",
                 "guidance=stable_diffusion", *stage_overrides(args.stage, base.mode, tmp, has_mesh)]
    cfg = load_config(args.config, overrides)

    info = distributed.setup(cfg.device)
    device = info.device
    torch.manual_seed(cfg.seed)
    phase = build_phase(cfg, info, tmp)
    trainer = Trainer(cfg, info, phase, tmp, make_generators(cfg.seed, info))
    phase.prepare(resumed=False)
    if args.frozen:   # AdamW at lr 0 still reads and writes every state: the step's work is unchanged
        for group in trainer.optimizer.param_groups:
            group["lr"] = 0.0
    it0 = 0 if args.stage != "fine" else 1  # fine: iterations past coarse_iter=0
    run_steps(trainer, it0 + 1, args.warmup)
    # The trainer does not synchronize per step (the host runs ahead), so the iteration time is the
    # wall time of `iters` consecutive steps between two device syncs, divided by `iters`.
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t_all = time.perf_counter()
    starts: list = []
    records: list = []
    step_ms = run_steps(trainer, it0 + args.warmup + 1, args.iters, starts, records)
    sync()
    mean_ms = (time.perf_counter() - t_all) * 1000 / args.iters
    periods = device_periods_ms(starts)                 # [iters - 1] device ms of each step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run_steps(trainer, it0 + args.warmup + args.iters + 1, 1)
    peak_step = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    floor = timed(floor_fn(phase, args.stage, cfg.batch, device), device, args.iters, args.warmup)
    eager_floor = None
    sd = phase.guide.model
    compiled = [c.name for c in sd.compiled_calls if c.failure is None]
    # Also the floor of the plain diffusers calls, neither graphed nor compiled (docs/DESIGN.md,
    # "Performance floor"): what the step and the floor above are measured against.
    if sd.unet_runner != sd.eager_unet or compiled:
        with sd.eager_calls():
            eager_floor = statistics.median(timed(floor_fn(phase, args.stage, cfg.batch, device), device,
                                                  args.iters, args.warmup))
    parts = breakdown(phase, trainer, args.stage, device, max(5, args.iters // 3))
    med, fl = mean_ms, statistics.median(floor)
    prof = (profile_steps(trainer, it0 + args.warmup + args.iters + 2, 5, Path(args.profile))
            if args.profile and device.type == "cuda" else None)
    result = {"config": args.config, "stage": args.stage, "overrides": args.overrides, "batch": cfg.batch,
              "train_res": cfg.train_res, "dmtet_grid": cfg.dmtet_grid,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "raster_backend": phase.ctx.backend,
              "encoder_backend": getattr(getattr(phase, "geo", None), "sdf_net", None) and phase.geo.sdf_net.backend,
              "frozen": args.frozen,
              **({"faces_median": statistics.median(r["faces"] for r in records)} if records and "faces" in records[0]
                 else {}),
              "iteration_ms": round(med, 3), "iteration_ms_note": "wall time of consecutive steps / count",
              "host_step_ms_median": round(statistics.median(step_ms), 3),
              # The median step: device time between consecutive steps' starts. Robust to rare
              # slow steps (e.g. the first step after the surface buffers were resized), which the
              # mean above includes.
              **({"iteration_ms_median": round(statistics.median(periods), 3),
                  "ratio_median": round(statistics.median(periods) / fl, 3),
                  "iteration_ms_max": round(max(periods), 3)} if periods else {}),
              "unet": "cuda_graph" if isinstance(sd.unet_runner, CudaGraphUNet) else "eager",
              "diffusion_compile": cfg.diffusion_compile, "compiled_calls": compiled,
              "compile_s": sd.compile_seconds(),
              "floor_ms_median": round(fl, 3), "ratio": round(med / fl, 3),
              **({"eager_floor_ms_median": round(eager_floor, 3),
                  "ratio_to_eager_floor": round(med / eager_floor, 3),
                  "floor_to_eager_floor": round(fl / eager_floor, 3),
                  **({"ratio_median_to_eager_floor": round(statistics.median(periods) / eager_floor, 3)}
                     if periods else {})} if eager_floor else {}),
              "breakdown_ms": parts,
              "peak_mem_gib": round(peak_step, 3) if peak_step is not None else None,
              **({"profile": prof} if prof else {})}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(f"{args.config} {args.stage}: {med:.1f} ms/it (median {result.get('iteration_ms_median')}), floor {fl:.1f} ms, "
          f"ratio {med / fl:.3f} (median {result.get('ratio_median')}), eager floor "
          f"{result.get('eager_floor_ms_median')} ms (median step / eager floor "
          f"{result.get('ratio_median_to_eager_floor')}), compiled {compiled or 'nothing'}, "
          f"peak {result['peak_mem_gib']} GiB; breakdown {parts}" + (f"; profile {prof}" if prof else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
