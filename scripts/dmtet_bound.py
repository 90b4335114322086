"""The best a DMTet grid can do for a reference: marching tets on the reference's exact SDF.

    python scripts/dmtet_bound.py REF.obj [--grid 128] [--mesh-scale 2.3] [--out bound.json]

Samples the reference's signed distance (libigl) at the tet-grid vertices of `--grid` inside the box
[-0.5, 0.5]^3 * mesh_scale, extracts the surface with the training code's marching tets and scores it
with scripts/evaluate.py (Chamfer / diagonal, IoU, F-score, normal consistency). No learning is
involved, so the numbers are the ceiling a recovery run at that grid can reach: a run far below it
is limited by optimization/guidance, a run close to it by the grid.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from geometry.marching_tets import marching_tets  # noqa: E402
from geometry.tet_grid import tet_grid  # noqa: E402
from geometry.sdf_init import mesh_signed_distance  # noqa: E402
from scripts import evaluate as ev  # noqa: E402


def bound(ref_path: str | Path, grid: int, mesh_scale: float, iou_resolution: int = 96) -> dict:
    verts, tets = tet_grid(grid)
    verts_vx3 = torch.from_numpy(verts).float() * mesh_scale
    ref = ev.load_surface(ref_path)
    sdf_v = torch.from_numpy(np.asarray(mesh_signed_distance(verts_vx3.numpy(), ref.verts, ref.faces))).float()
    v, f = marching_tets(verts_vx3, sdf_v, torch.from_numpy(tets).long())[:2]
    out = ev.Surface(v.numpy().astype(np.float64), f.numpy().astype(np.int64), f"dmtet{grid}")
    metrics = ev.surface_metrics(out, ref)
    return {"reference": str(ref_path), "grid": grid, "mesh_scale": mesh_scale, "faces": int(f.shape[0]),
            **metrics, "iou": ev.volume_iou(out, ref, resolution=iou_resolution)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reference")
    ap.add_argument("--grid", type=int, default=128)
    ap.add_argument("--mesh-scale", type=float, default=2.3, help="the config's mesh_scale (car: 2.3)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    result = bound(args.reference, args.grid, args.mesh_scale)
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
