"""Weak scaling: the same config at the same per-GPU batch on 1 and on N processes (torchrun).

    python scripts/weak_scaling.py --config configs/car_geometry.json --gpus 1 2 \
        --out /tmp/weak_scaling_2gpu.json iter=60 coarse_iter=30 sd_model=/tmp/sd21

Runs `torchrun --nproc_per_node=N train.py --config X key=value...` for each N, reads the run's
log.jsonl and reports the median iteration time per stage (after --skip warm-up iterations), the
ratio to the 1-process time, whether every rank held identical parameters at each save point
(the log's per-rank parameter checksums) and the azimuth range each rank sampled.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import distributed  # noqa: E402


def run(config: str, nproc: int, overrides: list[str], run_dir: Path) -> list[dict]:
    cmd = distributed.torchrun_command(nproc, [str(REPO / "train.py"), "--config", config, *overrides,
                                               f"out_dir={run_dir}"])
    subprocess.run(cmd, cwd=REPO, check=True)
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def azimuth_arc(degrees: list[float]) -> list[float]:
    """[start, end] of the shortest arc holding every azimuth, start in [-180, 180), end >= start
    (may pass 180): a sector across the +-180 seam reads e.g. [135, 315], not [-180, 180]."""
    a = sorted(((d + 180.0) % 360.0) - 180.0 for d in degrees)
    gaps = [a[i + 1] - a[i] for i in range(len(a) - 1)] + [a[0] + 360.0 - a[-1]]
    widest = max(range(len(a)), key=gaps.__getitem__)     # the arc starts after the widest gap
    start = a[(widest + 1) % len(a)]
    return [round(start, 1), round(start + 360.0 - gaps[widest], 1)]


def summarize(log: list[dict], skip: int) -> dict:
    stages: dict[str, list[float]] = {}
    for rec in log:
        stages.setdefault(rec["stage"], []).append(rec["ms"])
    per_stage = {s: round(statistics.median(ms[skip:] or ms), 2) for s, ms in stages.items()}
    checks = [r["param_checksum"] for r in log if "param_checksum" in r]
    ranks = len(log[0]["azimuth_deg"])
    az = [[a for r in log for a in r["azimuth_deg"][k]] for k in range(ranks)]
    return {"median_ms": per_stage, "iterations": len(log),
            "params_identical_across_ranks": bool(checks) and all(len({tuple(r) for r in c}) == 1 for c in checks),
            "checksums_checked": len(checks),
            "azimuth_range_deg_per_rank": [azimuth_arc(a) for a in az],
            "peak_mem_mb": max((r.get("peak_mem_mb", 0) for r in log), default=None)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--skip", type=int, default=10, help="warm-up iterations left out of the medians")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    args = ap.parse_args(argv)
    overrides = ["validate=false", "video_frames=0", *args.overrides]
    tmp = Path(tempfile.mkdtemp(prefix="scaling_"))
    results = {}
    for n in args.gpus:
        results[n] = summarize(run(args.config, n, overrides, tmp / f"n{n}"), args.skip)
        print(f"{n} process(es): {results[n]}", flush=True)
    base = results[args.gpus[0]]["median_ms"]
    for n, r in results.items():
        r["ratio_to_first"] = {s: round(ms / base[s], 3) for s, ms in r["median_ms"].items() if s in base}
    out = {"config": args.config, "overrides": overrides, "results": results,
           "env": {"NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE")}}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({n: r["ratio_to_first"] for n, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
