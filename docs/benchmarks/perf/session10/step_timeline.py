"""Session 10: where a profiled coarse step's device time goes, from bench.py --profile's trace.

  python docs/benchmarks/perf/session10/step_timeline.py TRACE.json.gz

Per step (consecutive UNet graph replays): the span from the end of one replay to the end of the
rasterizer's fine stage (backward, optimizer, geometry, rasterization) and from there to the next
replay (the ops after the rasterizer), each with the device's busy time in it; then, for the ops
between two replays, kernels / busy ms / idle ms before them by the innermost repository frame
that launched them. Graph replays are found by their cudaGraphLaunch correlation; kernels less
than 2 ms apart count as one replay (so a graph of the ops after the rasterizer, launched shortly
before the UNet's, is counted with it).
"""
import gzip
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
from scripts.bench import DEVICE_CATS, innermost_own_frames  # noqa: E402


def busy_us(acts: list[dict], t0: float, t1: float) -> float:
    total, cur = 0.0, t0
    for a in acts:
        s, e = max(a["ts"], cur), min(a["ts"] + a["dur"], t1)
        if e > s:
            total, cur = total + e - s, e
    return total


def main(trace: str) -> None:
    ev = json.load(gzip.open(trace, "rt"))["traceEvents"]
    acts = sorted((e for e in ev if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS), key=lambda e: e["ts"])
    graph_corr = {e["args"]["correlation"] for e in ev if e.get("cat") == "cuda_runtime"
                  and e["name"] == "cudaGraphLaunch"}
    spans: list[list[float]] = []
    for a in acts:
        if a.get("args", {}).get("correlation") in graph_corr:
            if spans and a["ts"] - spans[-1][1] < 2000:
                spans[-1][1] = max(spans[-1][1], a["ts"] + a["dur"])
            else:
                spans.append([a["ts"], a["ts"] + a["dur"]])
    for (s0, e0), (s1, _) in zip(spans, spans[1:]):
        fine = [a for a in acts if s0 < a["ts"] < s1 and a["name"].startswith("fineRaster")]
        r = fine[0]["ts"] + fine[0]["dur"]
        print(f"step {(s1 - s0) / 1000:.3f} ms: replays {(e0 - s0) / 1000:.3f} (busy {busy_us(acts, s0, e0) / 1000:.3f}) | "
              f"to rasterizer end {(r - e0) / 1000:.3f} (busy {busy_us(acts, e0, r) / 1000:.3f}) | "
              f"to next replay {(s1 - r) / 1000:.3f} (busy {busy_us(acts, r, s1) / 1000:.3f})")
    own = {str(p.relative_to(REPO)) for p in REPO.rglob("*.py")}
    launch = {e["args"]["correlation"]: e for e in ev if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"
              and "correlation" in e.get("args", {})}
    (_, e0), (s1, _) = spans[1], spans[2]
    sel = [a for a in acts if e0 <= a["ts"] < s1]
    launches = [launch.get(a.get("args", {}).get("correlation")) for a in sel]
    frames = iter(innermost_own_frames(ev, own, [x for x in launches if x is not None]))
    count, busy, idle, prev = Counter(), Counter(), Counter(), e0
    for a, x in zip(sel, launches):
        where = (next(frames) or x["name"]) if x is not None else "(no launch record: Triton)"
        count[where] += 1
        busy[where] += a["dur"]
        idle[where] += max(0.0, a["ts"] - prev)
        prev = max(prev, a["ts"] + a["dur"])
    print(f"{len(sel)} kernels between two replays; kernels, busy ms, idle ms before them, launching frame:")
    for where, n in count.most_common():
        print(f"{n:4d} {busy[where] / 1000:7.3f} {idle[where] / 1000:7.3f}  {where}")


if __name__ == "__main__":
    main(sys.argv[1])
