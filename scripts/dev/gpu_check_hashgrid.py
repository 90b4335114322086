"""Hash-grid kernel check: Triton vs PyTorch reference (values, gradients, speed).

On a GPU (the acceptance run):
    python scripts/dev/gpu_check_hashgrid.py                  # writes docs/results/parity/hashgrid.json
On CPU, correctness only, through the Triton interpreter (used by tests/test_hashgrid.py):
    python scripts/dev/gpu_check_hashgrid.py --device cpu --points 2000 --no-bench --out /tmp/h.json

Errors are max |triton - ref| / max |ref| over the whole tensor: per-element relative errors are
meaningless where outputs cancel to ~0. Tolerances: forward 1e-5 (same fp32 operations, only the
order of the 8-corner sum may differ); table gradient 1e-5 (atomic-add order), with and without
the input gradient (the kernel's two launch layouts); input gradient 1e-4
(sums of up to 16 levels x 8 corners of terms scaled by the level resolution, up to 4096, so
reassociation noise is amplified relative to the forward pass).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as `python scripts/dev/gpu_check_hashgrid.py` from anywhere
    sys.path.insert(0, str(REPO))

# --device cpu runs the kernels in Triton's interpreter. Triton picks interpreted or compiled mode
# when a kernel is defined, so the choice is made here, before geometry.hashgrid imports them.
if __name__ == "__main__":
    _device = argparse.ArgumentParser(add_help=False)
    _device.add_argument("--device", default="cuda")
    if _device.parse_known_args()[0].device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from geometry.hashgrid import (HashGridOptions, make_encoder, triton_interpreter_active,  # noqa: E402
                               triton_unavailable_reason)

# Triton is GPU-only software, often missing on CPU machines: main() reports its absence.
try:
    import triton
except ImportError:
    triton = None

TOLERANCES = {"forward": 1e-5, "grad_table": 1e-5, "grad_table_only": 1e-5, "grad_input": 1e-4}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter)")
    p.add_argument("--points", type=int, default=277_410, help="points for the benchmark (277k = "
                   "vertex count of the published 128 tet grid)")
    p.add_argument("--check-points", type=int, default=65_536, help="points for the parity check")
    p.add_argument("--iters", type=int, default=50, help="timed iterations per backend")
    p.add_argument("--no-bench", action="store_true", help="parity check only")
    p.add_argument("--log2-hashmap-size", type=int, default=19)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "parity" / "hashgrid.json"))
    return p.parse_args(argv)


def _rel(a, b) -> float:
    """Largest relative error over entries finite in both; inf when their NaN positions differ."""
    if not bool((a.isnan() == b.isnan()).all()):
        return float("inf")
    ok = a.isfinite() & b.isfinite()
    return float((a[ok] - b[ok]).abs().max() / b[ok].abs().max().clamp_min(1e-30))


def parity(device, n_points: int, opts, seed: int) -> dict:
    """Forward and gradient errors of the Triton backend against the reference, shared weights."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    aabb = torch.tensor([[-1.05, -1.05, -1.05], [1.05, 1.05, 1.05]], device=device)
    ref = make_encoder(aabb, opts, backend="torch")
    tri = make_encoder(aabb, opts, backend="triton")
    with torch.no_grad():  # larger than the default init so errors are measured on O(1) values
        ref.table.uniform_(-1.0, 1.0, generator=None)
        tri.table.copy_(ref.table)
    # 2% of the points outside the AABB exercise the clamp (zero input gradient there).
    x = (torch.rand(n_points, 3, generator=gen) * 2.2 - 1.1).to(device)
    gout = torch.randn(n_points, opts.output_dim, generator=gen)
    # As in the geometry stages most points get no gradient (the kernel skips their atomics), and
    # NaN must still reach the table and the input gradient: one point's whole level 1 (a test
    # for "any non-zero" written with a NaN-ignoring max would drop it) and one entry of another.
    gout[torch.arange(n_points) % 5 != 0] = 0.0
    f = opts.n_features_per_level
    gout[5, f:2 * f] = float("nan")
    gout[10, 0] = float("nan")
    gout = gout.to(device)
    results = {}
    outs, grads, table_only = [], [], []
    for enc in (ref, tri):
        xi = x.clone().requires_grad_(True)
        out = enc(xi)
        (out * gout).sum().backward()
        outs.append(out.detach())
        grads.append((enc.table.grad.detach(), xi.grad.detach()))
        # Without the input gradient the Triton backward runs one program per (block, level).
        enc.table.grad = None
        (enc(x) * gout).sum().backward()
        table_only.append(enc.table.grad.detach())
    results["forward"] = _rel(outs[1], outs[0])
    results["grad_table"] = _rel(grads[1][0], grads[0][0])
    results["grad_table_only"] = _rel(table_only[1], table_only[0])
    results["grad_input"] = _rel(grads[1][1], grads[0][1])
    results["passed"] = all(results[k] < TOLERANCES[k] for k in TOLERANCES)
    return results


def bench(device, n_points: int, opts, iters: int, seed: int) -> dict:
    """Median ms of forward + backward (to the table; and to table + inputs) per backend."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    aabb = torch.tensor([[-1.0] * 3, [1.0] * 3], device=device)
    x = (torch.rand(n_points, 3, generator=gen) * 2 - 1).to(device)
    result = {}
    for backend in ("torch", "triton"):
        enc = make_encoder(aabb, opts, backend=backend)
        for mode in ("table", "table+input"):
            xi = x.clone().requires_grad_(mode == "table+input")
            times = []
            for it in range(iters + 5):  # 5 warm-up iterations (compilation, allocator)
                torch.cuda.synchronize()
                start = time.perf_counter()
                enc.table.grad = None
                enc(xi).sum().backward()
                torch.cuda.synchronize()
                if it >= 5:
                    times.append((time.perf_counter() - start) * 1e3)
            result[f"{backend}_{mode}_ms"] = statistics.median(times)
    for mode in ("table", "table+input"):
        result[f"speedup_{mode}"] = result[f"torch_{mode}_ms"] / result[f"triton_{mode}_ms"]
    result["goal_5x_met"] = result["speedup_table"] >= 5.0
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    reason = triton_unavailable_reason()
    if reason is not None:
        print(f"error: the check needs triton: {reason}", file=sys.stderr)
        return 2
    if args.device == "cpu" and not triton_interpreter_active():
        print("error: --device cpu needs TRITON_INTERPRET=1 before the kernels load: run this file as a "
              "script, or set the variable", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run on a GPU machine, or pass --device cpu for the interpreter check",
              file=sys.stderr)
        return 2
    opts = HashGridOptions(log2_hashmap_size=args.log2_hashmap_size)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "triton": triton.__version__,
        "options": opts.__dict__, "tolerances": TOLERANCES, "check_points": args.check_points,
        "parity": parity(device, args.check_points, opts, args.seed),
    }
    if not args.no_bench:
        if device.type != "cuda":
            print("--device cpu runs the interpreter: benchmarks need CUDA; use --no-bench",
                  file=sys.stderr)
            return 2
        report["bench_points"] = args.points
        report["bench"] = bench(device, args.points, opts, args.iters, args.seed)
    _print_table(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if report["parity"]["passed"] else 1


def _print_table(report: dict) -> None:
    par = report["parity"]
    print(f"hash grid on {report['device']} (torch {report['torch']}, triton {report['triton']})")
    print(f"{'check':<12}{'max rel err':>14}{'tolerance':>12}")
    for key, tol in TOLERANCES.items():
        print(f"{key:<12}{par[key]:>14.3e}{tol:>12.0e}")
    print("parity:", "PASS" if par["passed"] else "FAIL")
    if "bench" in report:
        b = report["bench"]
        print(f"\n{report['bench_points']} points, fwd+bwd, median ms")
        print(f"{'backward to':<14}{'torch':>10}{'triton':>10}{'speedup':>10}")
        for mode in ("table", "table+input"):
            print(f"{mode:<14}{b[f'torch_{mode}_ms']:>10.2f}{b[f'triton_{mode}_ms']:>10.2f}"
                  f"{b[f'speedup_{mode}']:>9.1f}x")
        print("goal >= 5x (table):", "met" if b["goal_5x_met"] else "NOT met")


if __name__ == "__main__":
    sys.exit(main())
