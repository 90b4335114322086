"""A finer cut than session 5's cross_section.py, through a cup's floor: z = 0, x in [-0.5, 0.5],
y in [-0.22, 0.02] at 0.0125 x 0.01 (inside = winding number > 0.5).

    python docs/benchmarks/quality/session11/fine_cut.py OUTPUT.ply REFERENCE.obj
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from scripts import evaluate as ev  # noqa: E402

out, ref = ev.load_surface(sys.argv[1]), ev.load_surface(sys.argv[2])
xs, ys = np.linspace(-0.5, 0.5, 81), np.linspace(0.02, -0.22, 25)
points = np.array([[x, y, 0.0] for y in ys for x in xs])
a = ev.inside(out, points).reshape(len(ys), len(xs))
b = ev.inside(ref, points).reshape(len(ys), len(xs))
for i, y in enumerate(ys):
    print(f"{y:+.3f} " + "".join("#" if a[i, j] and b[i, j] else "+" if a[i, j] else "-" if b[i, j] else "."
                                 for j in range(len(xs))))
print("# both, + output only (extra), - reference only (missing)")
