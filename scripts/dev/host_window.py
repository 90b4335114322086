"""Host time of a geometry step's critical window, measured without the profiler (CUDA only).

    python scripts/dev/host_window.py --config configs/car_geometry.json [--steps 40] [key=value ...]

The rasterizer makes the host wait until the device has run everything queued, so from its return
until the UNet launch the device only has what the host queues meanwhile: that host time is,
nearly all of it, device idle time. The script wraps `render.raster.rasterize` and the UNet's
graph runner with host timers, runs the training step (`scripts.bench.run_steps`, the loop of
`Trainer.fit`) and prints medians of: the rasterizer call (its wait included), rasterizer return ->
UNet launch, and UNet launch -> the next rasterizer call. `torch.profiler` inflates exactly this
host time, which is why it is measured here with plain timers.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import distributed  # noqa: E402
import sd  # noqa: E402
from config import load_config  # noqa: E402
from phases import build_phase  # noqa: E402
# instrument() patches raster.rasterize: every caller looks it up on the module at call time.
from render import raster  # noqa: E402
from scripts.bench import run_steps  # noqa: E402
from trainer import Trainer, make_generators  # noqa: E402


def instrument(marks: list[tuple[str, float]]) -> None:
    """Record ("raster_in" / "raster_out" / "unet", host time) around the two calls."""
    rasterize = raster.rasterize

    def timed_rasterize(*args, **kwargs):
        marks.append(("raster_in", time.perf_counter()))
        out = rasterize(*args, **kwargs)
        marks.append(("raster_out", time.perf_counter()))
        return out
    raster.rasterize = timed_rasterize
    launch = sd.CudaGraphUNet.__call__

    def timed_launch(self, *args):
        marks.append(("unet", time.perf_counter()))
        return launch(self, *args)
    sd.CudaGraphUNet.__call__ = timed_launch


def windows(marks: list[tuple[str, float]]) -> dict[str, float]:
    """Median ms of the three host intervals per step."""
    wait, post, pre = [], [], []
    last = {}
    for name, t in marks:
        if name == "raster_in" and "unet" in last:
            pre.append(t - last["unet"])
        if name == "raster_out":
            wait.append(t - last["raster_in"])
        if name == "unet" and "raster_out" in last:
            post.append(t - last["raster_out"])
        last[name] = t
    med = lambda v: round(statistics.median(v) * 1000, 3)   # noqa: E731
    return {"rasterize_call_ms": med(wait), "raster_return_to_unet_launch_ms": med(post),
            "unet_launch_to_next_rasterize_ms": med(pre)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--sd-model", default=str(Path(tempfile.gettempdir()) / "sd21_base_random"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: needs a CUDA device (the window is the host's wait for one)", file=sys.stderr)
        return 2
    marks: list[tuple[str, float]] = []
    instrument(marks)

    tmp = Path(tempfile.mkdtemp(prefix="host_window_"))
    cfg = load_config(args.config, [f"sd_model={args.sd_model}", "validate=false", "guidance=stable_diffusion",
                                    f"out_dir={tmp / 'run'}", *args.overrides])
    info = distributed.setup(cfg.device)
    phase = build_phase(cfg, info, tmp)
    trainer = Trainer(cfg, info, phase, tmp, make_generators(cfg.seed, info))
    phase.prepare(resumed=False)
    run_steps(trainer, 1, 10)                  # warm-up: graph capture, kernel selection, buffers
    torch.cuda.synchronize()
    marks.clear()
    t0 = time.perf_counter()
    run_steps(trainer, 11, args.steps)
    torch.cuda.synchronize()
    result = {"config": args.config, "overrides": args.overrides, "stage": phase.stage(11),
              "iteration_ms": round((time.perf_counter() - t0) * 1000 / args.steps, 3), **windows(marks)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
