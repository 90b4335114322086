"""Change G again, timed by its GPU kernels: session 7's microbenchmark (`../session7/resize_microbench.py`)
put CUDA events around one Python forward + backward, so both variants measured host dispatch
(~0.3 ms each, session 8). Here torch.profiler sums the device time of the kernels each variant
launches over `--iters` calls of forward + backward (4 x 512^2 x 4 -> 64^2), and CUDA events around
all the calls give the throughput with the host kept ahead (no synchronisation inside the loop).

    python docs/benchmarks/perf/session8/resize_kernels.py OUT.json [--device cuda:0] [--iters 200]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from render.util import resize_bilinear_aa  # noqa: E402


def interpolate_aa(img_bxhxwxc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(img_bxhxwxc.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False,
                         antialias=True)


def calls(fn, img: torch.Tensor, grad: torch.Tensor, n: int) -> None:
    for _ in range(n):
        x = img.detach().requires_grad_(True)
        fn(x, (64, 64)).backward(grad)


def kernel_ms(fn, img: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    """Device time of the kernels per call (profiler), ms."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        calls(fn, img, grad, iters)
        torch.cuda.synchronize()
    total_us = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA")
    return total_us / 1000 / iters


def loop_ms(fn, img: torch.Tensor, grad: torch.Tensor, iters: int) -> float:
    """Wall time per call of `iters` back-to-back calls between two CUDA events, ms."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    calls(fn, img, grad, iters)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out")
    p.add_argument("--device", default="cuda", help="a CUDA device (CUDA events and kernel profiling)")
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type != "cuda" or not torch.cuda.is_available():
        p.error(f"--device: expected an available CUDA device (it times CUDA kernels); got {a.device!r}")
    torch.cuda.set_device(device)                                       # events and synchronize use it too
    img = torch.rand(4, 512, 512, 4, device=device)                     # [B, H, W, normal xyz + mask]
    grad = torch.randn(4, 4, 64, 64, device=device)
    variants = {"interpolate_aa": interpolate_aa, "matmul": resize_bilinear_aa}
    for fn in variants.values():
        calls(fn, img, grad, 20)                                        # warm-up (cuBLAS handles, caches)
    result = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "iters": a.iters}
    for rep in (1, 2):                                                  # alternated twice: order effects show
        for name, fn in variants.items():
            result[f"{name}_kernel_ms_{rep}"] = kernel_ms(fn, img, grad, a.iters)
            result[f"{name}_loop_ms_{rep}"] = loop_ms(fn, img, grad, a.iters)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
