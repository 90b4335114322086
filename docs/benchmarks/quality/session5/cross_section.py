"""Cross-section z = 0 of an output mesh against its reference, as text (inside = winding number > 0.5).

    python docs/benchmarks/quality/session5/cross_section.py OUTPUT.obj REFERENCE.obj
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from scripts import evaluate as ev  # noqa: E402


def cut(out_path: str, ref_path: str, xs: np.ndarray | None = None, ys: np.ndarray | None = None,
        fmt: str = "{:5.2f} ") -> str:
    """The z = 0 cut at columns xs and rows ys (default: the reference's box with a 0.05 margin,
    61 x 31 samples); '#' both, '+' output only (extra), '-' reference only (missing)."""
    out, ref = ev.load_surface(out_path), ev.load_surface(ref_path)
    lo, hi = ref.verts.min(0) - 0.05, ref.verts.max(0) + 0.05
    xs = np.linspace(lo[0], hi[0], 61) if xs is None else xs
    ys = np.linspace(hi[1], lo[1], 31) if ys is None else ys
    points = np.array([[x, y, 0.0] for y in ys for x in xs])
    a = ev.inside(out, points).reshape(len(ys), len(xs))
    b = ev.inside(ref, points).reshape(len(ys), len(xs))
    lines = [fmt.format(y) + "".join("#" if a[i, j] and b[i, j] else "+" if a[i, j] else "-" if b[i, j] else "."
                                     for j in range(len(xs))) for i, y in enumerate(ys)]
    return "\n".join(lines + ["# both, + output only (extra), - reference only (missing)"])


if __name__ == "__main__":
    print(cut(sys.argv[1], sys.argv[2]))
