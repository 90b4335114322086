"""scripts/bench.py: attributing the host's waits for the device in a profiler trace; the floor's calls."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scripts.bench import blocking_waits, device_idle, device_periods_ms, diffusion_calls
from sd import GuidanceOptions, StableDiffusionGuidance
from scripts.dev.host_window import windows


def _span(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_blocking_waits_names_the_innermost_own_frame() -> None:
    own = {"trainer.py", "geometry/dmtet.py"}
    events = [
        _span("python_function", "trainer.py(250): train_step", 0, 10_000),
        _span("python_function", "geometry/dmtet.py(290): _marching_tets_topo", 100, 3_000),
        _span("python_function", "torch/_tensor.py(1): tolist", 200, 2_000),        # not ours
        _span("cuda_runtime", "cudaMemcpyAsync", 300, 1_500),                       # waited 1.5 ms
        _span("cuda_runtime", "cudaStreamSynchronize", 5_000, 600),                  # in train_step only
        _span("cuda_runtime", "cudaStreamSynchronize", 6_000, 50),                   # too short to count
        _span("cuda_runtime", "cudaLaunchKernel", 7_000, 900),                       # not a wait
        _span("cuda_runtime", "cudaEventSynchronize", 20_000, 400),                  # outside own frames
        {"ph": "i", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 0},      # not a span
    ]
    waits = blocking_waits(events, steps=2, own_files=own)
    assert waits == {"geometry/dmtet.py(290): _marching_tets_topo": 0.75,
                     "trainer.py(250): train_step": 0.3,
                     "cudaEventSynchronize": 0.2}
    assert list(waits) == sorted(waits, key=waits.get, reverse=True)             # longest first


def _dev(name: str, ts: float, dur: float, corr: int) -> dict:
    return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"correlation": corr}}


def _launch(ts: float, corr: int, tid: int = 1) -> dict:
    return {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": ts, "dur": 5, "tid": tid,
            "args": {"correlation": corr}}


def test_device_idle_charges_each_gap_to_the_host_code_that_launched_the_next_kernel() -> None:
    own = {"phases.py", "render/raster.py"}
    frame = lambda name, ts, dur, tid=1: {**_span("python_function", name, ts, dur), "tid": tid}  # noqa: E731
    events = [
        frame("phases.py(10): step", 0, 10_000),
        frame("render/raster.py(5): rasterize", 100, 400),
        frame("render/raster.py(9): antialias", 2_000, 500),
        frame("phases.py(99): backward_hook", 100, 9_000, tid=2),     # another thread: never around tid 1
        _launch(150, 1), _dev("k1", 200, 100, 1),                       # first activity: no gap before it
        _dev("k1b", 250, 300, 7),                                       # overlaps k1: busy until 550
        _launch(2_100, 2), _dev("k2", 2_150, 100, 2),                   # idle 1600 us, launched in antialias
        _launch(2_300, 3), _dev("k3", 2_252, 10, 3),                    # 2 us gap: under min_us
        _launch(3_000, 4, tid=2), _dev("k4", 3_062, 38, 4),             # idle 800 us, launched on tid 2
        _dev("memcpy", 4_100, 100, 99),                                 # idle 1000 us, no launch on record
    ]
    for e in events[-2:]:
        e["cat"] = "gpu_memcpy" if e["name"] == "memcpy" else e["cat"]
    total, where = device_idle(events, steps=2, own_files=own)
    assert where == {"render/raster.py(9): antialias": 0.8, "memcpy": 0.5, "phases.py(99): backward_hook": 0.4}
    assert total == 1.7


def test_host_window_medians_from_marks() -> None:
    """scripts/dev/host_window.py: the three host intervals of each step, from the timer marks."""
    marks = []
    for k in range(3):                          # steps 100 ms apart; the second step's window is longer
        t = 0.1 * k
        post = 0.002 if k == 1 else 0.001
        marks += [("raster_in", t), ("raster_out", t + 0.016), ("unet", t + 0.016 + post)]
    got = windows(marks)
    assert got["rasterize_call_ms"] == 16.0
    assert got["raster_return_to_unet_launch_ms"] == 1.0              # median of 1, 2, 1 ms
    assert got["unet_launch_to_next_rasterize_ms"] == pytest.approx(82.5, abs=1e-6)   # 83, 82 ms


def test_device_periods_are_the_gaps_between_step_starts() -> None:
    class Event:                                   # stands in for torch.cuda.Event
        def __init__(self, t: float) -> None:
            self.t = t

        def elapsed_time(self, later: "Event") -> float:
            return later.t - self.t
    assert device_periods_ms([Event(0.0), Event(10.0), Event(25.0)]) == [10.0, 15.0]
    assert device_periods_ms([Event(0.0)]) == []


def test_floor_makes_the_steps_calls_through_the_configured_runners(tiny_sd_path: Path) -> None:
    """The floor times whatever the step runs (compiled or graphed calls); eager_calls() gives the
    plain diffusers baseline."""
    guidance = StableDiffusionGuidance(GuidanceOptions(sd_model=str(tiny_sd_path), text="a red car",
                                                       image_resolution=64, diffusion_compile="off"), "cpu")
    seen: list[tuple[str, tuple[int, ...]]] = []
    vae, unet = guidance.vae_runner, guidance.unet_runner
    guidance.vae_runner = lambda x: seen.append(("vae", tuple(x.shape))) or vae(x)
    guidance.unet_runner = lambda z, t, e: seen.append(("unet", tuple(z.shape))) or unet(z, t, e)
    diffusion_calls(guidance, "fine", 2, torch.device("cpu"))()
    diffusion_calls(guidance, "coarse", 2, torch.device("cpu"))()
    assert seen == [("vae", (2, 3, 64, 64)), ("unet", (4, 4, 8, 8)), ("unet", (4, 4, 8, 8))]
    with guidance.eager_calls():
        diffusion_calls(guidance, "appearance", 2, torch.device("cpu"))()
    assert len(seen) == 3
