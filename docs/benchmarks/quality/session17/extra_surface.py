"""Where an output mesh has surface that the reference lacks: the samples of the output's surface
farther than 0.02 from the reference's, their share of the area, where they lie (height y and
distance r from the vertical axis) and which way they face (a thin plate: as much up as down).

    python docs/benchmarks/quality/session17/extra_surface.py REFERENCE.obj OUTPUT.ply [OUTPUT.ply ...]
"""
import sys

import numpy as np
import trimesh
from scipy.spatial import cKDTree

FAR = 0.02                 # as scripts/evaluate.py's out_far
QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]


def describe(ref_tree: cKDTree, path: str, samples: int = 50000) -> str:
    mesh = trimesh.load(path, force="mesh", process=False)
    points_nx3, face_n = trimesh.sample.sample_surface(mesh, samples, seed=0)
    up_n = mesh.face_normals[face_n][:, 1]
    dist_n, _ = ref_tree.query(points_nx3)
    far_n = dist_n > FAR
    head = f"{path}: area {mesh.area:.3f}, far from the reference {far_n.mean():.3f} of it ({far_n.mean() * mesh.area:.3f})"
    if not far_n.any():
        return head
    r_n = np.linalg.norm(points_nx3[:, [0, 2]], axis=1)
    q = lambda v: " ".join(f"{x:.3f}" for x in np.quantile(v, QUANTILES))   # noqa: E731
    return "\n".join([head,
                      f"  far samples' y at quantiles {QUANTILES}: {q(points_nx3[far_n, 1])}",
                      f"  their r: {q(r_n[far_n])}",
                      f"  their distance to the reference: {q(dist_n[far_n])}",
                      f"  facing up (n_y > 0.7) {(up_n[far_n] > 0.7).mean():.2f}, down (n_y < -0.7) "
                      f"{(up_n[far_n] < -0.7).mean():.2f}"])


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    ref = trimesh.load(argv[0], force="mesh", process=False)
    # Dense samples of the reference stand in for its surface (spacing ~0.003, well below FAR).
    ref_points, _ = trimesh.sample.sample_surface(ref, 400000, seed=1)
    tree = cKDTree(ref_points)
    print("\n".join(describe(tree, p) for p in argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
