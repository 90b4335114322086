"""Where an output mesh has surface that the reference lacks: the output's surface samples farther
from the reference than scripts/evaluate.py's `out_far` threshold (a fraction of the reference's
diagonal), their share of the area, where they lie (height y, distance r from the vertical axis)
and which way they face (a thin plate: as much up as down).

    python docs/benchmarks/quality/session17/extra_surface.py REFERENCE.obj OUTPUT.ply [OUTPUT.ply ...]
"""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from scripts import evaluate as ev  # noqa: E402

FAR = ev.FAR_THRESHOLD      # the eval files' out_far threshold, x the reference's diagonal
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]


def describe(ref: ev.Surface, path: str, samples: int = 50_000) -> str:
    out = ev.load_surface(path)
    points_nx3, normals_nx3 = ev.sample_surface(out, samples, np.random.default_rng(0))
    dist_n, _ = ev.directed_distances(points_nx3, normals_nx3, ref)
    far_n = dist_n > FAR * ref.diagonal
    area = ev.face_areas(out).sum()
    head = (f"{Path(path).name}: area {area:.3f}, farther than {FAR * ref.diagonal:.3f} from the reference: "
            f"{far_n.mean():.3f} of it ({far_n.mean() * area:.3f})")
    if not far_n.any():
        return head
    up_n = normals_nx3[far_n, 1]
    q = lambda v: " ".join(f"{x:.3f}" for x in np.quantile(v, QUANTILES))   # noqa: E731
    return "\n".join([head,
                      f"  far samples' y at quantiles {QUANTILES}: {q(points_nx3[far_n, 1])}",
                      f"  their r: {q(np.linalg.norm(points_nx3[far_n][:, [0, 2]], axis=1))}",
                      f"  their distance to the reference: {q(dist_n[far_n])}",
                      f"  facing up (n_y > 0.7) {(up_n > 0.7).mean():.2f}, "
                      f"down (n_y < -0.7) {(up_n < -0.7).mean():.2f}"])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    ref = ev.load_surface(argv[0])
    print("\n".join(describe(ref, p) for p in argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
