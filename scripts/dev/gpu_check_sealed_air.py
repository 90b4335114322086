"""Sealed-air search on a GPU: the same vertices as on the CPU, and its cost per training step.

    python scripts/dev/gpu_check_sealed_air.py            # writes docs/results/parity/sealed_air.json
    python scripts/dev/gpu_check_sealed_air.py --device cpu --grids 64 128 --iters 3 --out /tmp/s.json

The test shape is a spherical shell around a sealed spherical void, offset from the grid's centre
(so the inside's bounding box is not the whole grid) plus a second, open cavity (a hole through
the shell that joins a pocket to the outside: air there is not sealed). The search runs every
SEALED_AIR_EVERY steps in training (phases.py), so its cost per step is the time of one
search divided by that. It waits for the device (the labels come from scipy on the host), which is
included in the timings: each is synchronized before and after.

Also checks that the Triton hash-grid backend takes an empty batch (forward and backward), which
the geometry phase's sealed-air term may hand it when nothing is sealed.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from geometry.dmtet import sealed_air  # noqa: E402
from geometry.tet_grid import tet_grid  # noqa: E402
from geometry.hashgrid import make_encoder, triton_unavailable_reason  # noqa: E402
from phases.geometry import SEALED_AIR_EVERY  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--grids", type=int, nargs="+", default=[128, 256])
    p.add_argument("--iters", type=int, default=30, help="timed searches per grid")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "parity" / "sealed_air.json"))
    return p.parse_args(argv)


def shell_with_void_sdf(verts_vx3):
    """[V] SDF (negative inside) of a shell 0.12 < r < 0.3 about (0.05, -0.03, 0.02) with a tunnel of
    radius 0.06 along +x from r = 0.2 outward, so the pocket 0.2 < r < 0.25 it crosses is open air;
    the void r < 0.12 is sealed."""
    c = torch.tensor([0.05, -0.03, 0.02], device=verts_vx3.device)
    p = verts_vx3 - c
    r = p.norm(dim=1)
    shell = torch.maximum(r - 0.3, 0.12 - r)                               # inside the shell: < 0
    pocket = torch.minimum(r - 0.2, 0.25 - r).clamp_min(-1)                # > 0 inside the pocket
    tunnel = torch.where(p[:, 0] > 0.15, 0.06 - p[:, 1:].norm(dim=1), torch.full_like(r, -1.0))
    return torch.maximum(torch.maximum(shell, pocket), tunnel)


def check_grid(grid_res: int, device, iters: int) -> dict:
    verts_vx3 = torch.from_numpy(tet_grid(grid_res)[0]).to(device)
    sdf_v = shell_with_void_sdf(verts_vx3)
    expected = sealed_air(sdf_v.cpu(), grid_res)
    void = (verts_vx3 - torch.tensor([0.05, -0.03, 0.02], device=device)).norm(dim=1) < 0.12
    times = []
    for it in range(iters + 3):   # 3 warm-up searches (scipy import, allocator)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        got = sealed_air(sdf_v, grid_res)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if it >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    got = got.cpu()
    return {"grid": grid_res, "vertices": int(sdf_v.numel()), "sealed": int(got.sum()),
            "void_vertices": int(void.sum()), "matches_cpu": bool(torch.equal(got, expected)),
            "sealed_is_the_void": bool(torch.equal(got, void.cpu())),
            "median_ms": statistics.median(times), "max_ms": max(times)}


def triton_empty_batch(device) -> dict:
    reason = triton_unavailable_reason()
    if device.type != "cuda" or reason is not None:
        return {"ran": False, "why": reason or "not a CUDA device"}
    aabb_2x3 = torch.tensor([[-1.0] * 3, [1.0] * 3], device=device)
    enc = make_encoder(aabb_2x3, backend="triton")
    x_0x3 = torch.zeros(0, 3, device=device, requires_grad=True)
    out = enc(x_0x3)
    out.sum().backward()
    torch.cuda.synchronize()
    return {"ran": True, "out_shape": list(out.shape), "grad_input_shape": list(x_0x3.grad.shape),
            "grad_table_zero": bool((enc.table.grad == 0).all())}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    grids = [check_grid(g, device, args.iters) for g in args.grids]
    for g in grids:
        g["ms_per_step"] = g["median_ms"] / SEALED_AIR_EVERY
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "torch": torch.__version__, "search_every": SEALED_AIR_EVERY, "grids": grids,
              "triton_empty_batch": triton_empty_batch(device)}
    result["passed"] = all(g["matches_cpu"] and g["sealed_is_the_void"] for g in grids) and (
        not result["triton_empty_batch"]["ran"] or result["triton_empty_batch"]["out_shape"] == [0, 32])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'grid':>5} {'sealed':>7} {'void':>7} {'cpu==':>6} {'median ms':>10} {'ms/step':>8}")
    for g in grids:
        print(f"{g['grid']:>5} {g['sealed']:>7} {g['void_vertices']:>7} {str(g['matches_cpu']):>6} "
              f"{g['median_ms']:>10.2f} {g['ms_per_step']:>8.3f}")
    print("triton empty batch:", result["triton_empty_batch"], "| passed:", result["passed"])
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
