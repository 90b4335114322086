"""Write the example user mesh used by configs/user_mesh_geometry.json.

    python scripts/make_example_mesh.py [--out data/meshes/bunny_like.obj] [--grid 56]

A procedural "bunny-like" closed surface (body, head, two ears, tail; y up, facing +z): the smooth
union of ellipsoids is evaluated on the project's tet grid and extracted with the project's own
marching tets (geometry/dmtet.py), lightly Taubin-smoothed, and written as a plain OBJ (positions
and faces only, 5 decimals) that stays well under 200 KB. Deterministic: the same command writes
the same file. Any watertight or open OBJ/PLY/STL/GLB/OFF of your own works the same way as
`base_mesh` (it is centred and scaled into the unit sphere before the SDF is fitted).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from geometry.marching_tets import marching_tets  # noqa: E402
from geometry.tet_grid import tet_grid  # noqa: E402

DEFAULT_OUT = ROOT / "data" / "meshes" / "bunny_like.obj"

# (centre, radii) of the ellipsoids, in a box of [-1, 1]^3.
PARTS = (
    ((0.00, -0.22, -0.08), (0.40, 0.36, 0.48)),   # body
    ((0.00, 0.18, 0.30), (0.24, 0.23, 0.24)),     # head
    ((0.10, 0.56, 0.22), (0.075, 0.24, 0.06)),    # right ear
    ((-0.10, 0.56, 0.22), (0.075, 0.24, 0.06)),   # left ear
    ((0.00, -0.14, -0.58), (0.11, 0.11, 0.11)),   # tail
    ((0.17, -0.55, 0.22), (0.10, 0.06, 0.16)),    # right front foot
    ((-0.17, -0.55, 0.22), (0.10, 0.06, 0.16)),   # left front foot
)
SMOOTH_K = 0.08  # smooth-union blend radius


def ellipsoid_sdf(p: np.ndarray, centre: tuple, radii: tuple) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (exact on spheres)."""
    q = (p - np.asarray(centre)) / np.asarray(radii)
    return (np.linalg.norm(q, axis=-1) - 1.0) * min(radii)


def smooth_min(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b * (1 - h) + a * h - k * h * (1 - h)


def bunny_sdf(p: np.ndarray) -> np.ndarray:
    d = ellipsoid_sdf(p, *PARTS[0])
    for centre, radii in PARTS[1:]:
        d = smooth_min(d, ellipsoid_sdf(p, centre, radii), SMOOTH_K)
    return d


def build(grid: int) -> tuple[np.ndarray, np.ndarray]:
    verts, tets = tet_grid(grid)
    verts = verts.astype(np.float64) * 2.0                       # [-1, 1]^3
    sdf = bunny_sdf(verts)
    v, f = marching_tets(torch.from_numpy(verts).float(), torch.from_numpy(sdf).float(),
                         torch.from_numpy(np.asarray(tets, dtype=np.int64)))
    mesh = trimesh.Trimesh(v.numpy().astype(np.float64), f.numpy(), process=True)  # merges duplicates
    trimesh.smoothing.filter_taubin(mesh, lamb=0.5, nu=0.53, iterations=10)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def write_obj(path: Path, verts: np.ndarray, faces: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# bunny-like example mesh, written by scripts/make_example_mesh.py"]
    lines += [f"v {x:.5f} {y:.5f} {z:.5f}" for x, y, z in verts.tolist()]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--grid", type=int, default=56, help="tet grid resolution (even); higher = more faces")
    args = ap.parse_args(argv)
    verts, faces = build(args.grid)
    write_obj(args.out, verts, faces)
    print(f"wrote {args.out}: {len(verts)} vertices, {len(faces)} faces, "
          f"{args.out.stat().st_size / 1024:.0f} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
