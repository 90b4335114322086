"""Table of the bench.py JSON files in a folder (session 10's A/B runs): median step, floor, ratios, peak."""
import json
import sys
from pathlib import Path

print(f"{'run':24s} {'median ms':>9s} {'floor':>7s} {'ratio med':>9s} {'mean ratio':>10s} {'peak GiB':>8s}")
for p in sorted(Path(sys.argv[1]).glob("l_*.json")):
    d = json.loads(p.read_text())
    print(f"{p.stem:24s} {d.get('iteration_ms_median', 0):9.3f} {d['floor_ms_median']:7.3f} "
          f"{d.get('ratio_median', 0):9.3f} {d['ratio']:10.3f} {d['peak_mem_gib']:8.3f}")
