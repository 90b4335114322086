"""Change G of session 5 measured alone: the coarse latent resize (4 x 512^2 normal+mask -> 64^2),
forward + backward, as PyTorch's antialiased interpolate (before) and as two matrix products
(`render.util.resize_bilinear_aa`, after), in one process.

    python docs/benchmarks/perf/session7/resize_microbench.py OUT.json [--device cuda] [--iters 200]
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from render.util import resize_bilinear_aa  # noqa: E402


def interpolate_aa(img_bxhxwxc: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(img_bxhxwxc.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False,
                         antialias=True)


def time_ms(fn, img: torch.Tensor, iters: int) -> float:
    """Median ms of forward + backward (CUDA events on a GPU, wall clock on CPU)."""
    grad = torch.randn(img.shape[0], img.shape[3], 64, 64, device=img.device)
    times = []
    for i in range(iters + 10):                                  # 10 warm-up calls
        x = img.detach().requires_grad_(True)
        if img.is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        fn(x, (64, 64)).backward(grad)
        if img.is_cuda:
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1000
        if i >= 10:
            times.append(ms)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out")
    p.add_argument("--device", default="cuda")
    p.add_argument("--iters", type=int, default=200)
    a = p.parse_args()
    img = torch.rand(4, 512, 512, 4, device=a.device)           # [B, H, W, normal xyz + mask]
    err = float((resize_bilinear_aa(img, (64, 64)) - interpolate_aa(img, (64, 64))).abs().max())
    result = {"device": torch.cuda.get_device_name() if img.is_cuda else "cpu", "torch": torch.__version__,
              "shape": [4, 512, 512, 4], "size": [64, 64], "max_abs_difference": err,
              "interpolate_aa_ms": time_ms(interpolate_aa, img, a.iters),
              "matmul_ms": time_ms(resize_bilinear_aa, img, a.iters)}
    # Each twice, alternating, so an order effect shows as a gap between the two readings.
    result["interpolate_aa_ms_again"] = time_ms(interpolate_aa, img, a.iters)
    result["matmul_ms_again"] = time_ms(resize_bilinear_aa, img, a.iters)
    Path(a.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
