"""Cross-section z = 0 of an output mesh against its reference, as text (inside = winding number > 0.5).

    python docs/benchmarks/quality/session5/cross_section.py OUTPUT.obj REFERENCE.obj
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from scripts import evaluate as ev  # noqa: E402

out, ref = ev.load_surface(sys.argv[1]), ev.load_surface(sys.argv[2])
lo, hi = ref.verts.min(0) - 0.05, ref.verts.max(0) + 0.05          # the reference's box, a margin around
xs, ys = np.linspace(lo[0], hi[0], 61), np.linspace(hi[1], lo[1], 31)
points = np.array([[x, y, 0.0] for y in ys for x in xs])
a = ev.inside(out, points).reshape(len(ys), len(xs))
b = ev.inside(ref, points).reshape(len(ys), len(xs))
for i, y in enumerate(ys):
    print(f"{y:5.2f} " + "".join("#" if a[i, j] and b[i, j] else "+" if a[i, j] else "-" if b[i, j] else "."
                                 for j in range(len(xs))))
print("# both, + output only (extra), - reference only (missing)")
