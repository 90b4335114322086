"""A finer cut than session 5's cross_section.py, through a cup's floor: z = 0, x in [-0.5, 0.5],
y in [-0.22, 0.02] at 0.0125 x 0.01 (inside = winding number > 0.5).

    python docs/benchmarks/quality/session11/fine_cut.py OUTPUT.ply REFERENCE.obj
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "session5"))
from cross_section import cut  # noqa: E402

print(cut(sys.argv[1], sys.argv[2], np.linspace(-0.5, 0.5, 81), np.linspace(0.02, -0.22, 25), "{:+.3f} "))
