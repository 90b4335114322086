"""How hard the geometry objective pushes back on a froth of single-cell blobs in a hollow, per tet
grid and silhouette-gradient method: what decides whether froth, once seeded, grows or dies.

    python scripts/make_reference_meshes.py /tmp/quality_refs
    python scripts/dev/froth_restoring.py /tmp/quality_refs/bowl.obj --out froth.json

The SDF at the grid's vertices is the target's signed distance, clamped to two cells outside (the
surface is the target's; far from it the field is near zero, as a trained one in an unseen hollow).
Froth: a share of the hollow's vertices (outside the target, inside its convex hull) made solid at
-2 cells (--blob-depth), so each is a blob about one cell across. For each stage's input as the
car config renders it (coarse: the 64^2 normal + mask latent; fine: 8x8 pooled 512^2 normal images,
as target-mesh guidance encodes them; pixels: the fine stage's images unpooled, for contrast), over
the same training cameras:

- `excess_loss`: L(froth) - L(clean), L = 0.5 |z - z*|^2 / views against the target's render z*
  (the SDS gradient of target-mesh guidance is this loss's, scaled per time step);
- the restoring derivative: raising every froth vertex's SDF by one cell (shrinking the blobs),
  dL/d(raise) by central finite difference against the analytic one (the gradient at the froth
  vertices, summed), for each antialias method. `captured` = analytic / finite difference: the
  share of the push back that reaches the SDF. A method that captures little at a grid leaves
  froth there nearly free to grow.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from config import Config, load_config  # noqa: E402
from dataset.cameras import CameraBatch, azimuth_sector, sample_train_cameras  # noqa: E402
from geometry.marching_tets import marching_tets  # noqa: E402
from geometry.sdf_init import mesh_signed_distance  # noqa: E402
from geometry.tet_grid import tet_cell, tet_grid  # noqa: E402
from guidance.base import IMAGE, NORMAL_MASK, StageInput  # noqa: E402
from guidance.target_mesh import pooled_latents  # noqa: E402
from phases.geometry import NormalStageRenderer  # noqa: E402
from render import raster  # noqa: E402
from scripts.dev.cavity_probe import region_of  # noqa: E402
from trainer import camera_options  # noqa: E402

CAVITY = 1          # region_of's label of the hollow
FAR_FIELD = 2.0     # the clamp of the SDF outside the target, in cells


# name -> (what the phase renders, 8x8 pooled as target-mesh guidance encodes images)
STAGES = {"coarse": (NORMAL_MASK, False), "fine": (IMAGE, True), "pixels": (IMAGE, False)}


def stage_inputs(cfg) -> dict[str, tuple[StageInput, bool]]:
    """coarse and fine as the phase and target-mesh guidance make them; pixels: the fine stage's
    images compared unpooled (what the loss would see without the latents' 8x8 averaging)."""
    side = max(cfg.train_res) // 8
    return {name: (StageInput(kind, side if kind == NORMAL_MASK else None), pool)
            for name, (kind, pool) in STAGES.items()}


def latents(render: NormalStageRenderer, verts: torch.Tensor, faces: torch.Tensor, cams: CameraBatch,
            stage: tuple[StageInput, bool]) -> torch.Tensor:
    spec, pool = stage
    x = render(verts, faces, cams, spec)
    return pooled_latents(x) if pool else x


@dataclass
class Scene:
    """What every grid is measured against: the config, the cameras, a renderer per antialias
    method and the target's render per stage."""
    cfg: Config
    cams: CameraBatch
    renderers: dict[str, NormalStageRenderer]
    targets: dict[str, torch.Tensor]

    def loss(self, sdf_v: torch.Tensor, grid_v: torch.Tensor, tets: torch.Tensor, stage: str,
             method: str = "pixel") -> torch.Tensor:
        """0.5 |z - z*|^2 per view of the surface of `sdf_v` on the grid (grid_v [V, 3], tets [T, 4])."""
        verts, faces = marching_tets(grid_v, sdf_v, tets)
        z = latents(self.renderers[method], verts, faces, self.cams, stage_inputs(self.cfg)[stage])
        return 0.5 * (z - self.targets[stage]).pow(2).sum() / len(z)


def grid_case(args: argparse.Namespace, grid: int, mesh: trimesh.Trimesh, scene: Scene) -> dict:
    verts_np, tets_np = tet_grid(grid)
    grid_v = torch.from_numpy(verts_np) * scene.cfg.mesh_scale                 # [V, 3] world
    tets = torch.from_numpy(tets_np)                                            # [T, 4]
    cell = tet_cell(grid, scene.cfg.mesh_scale)
    start = time.perf_counter()
    signed = mesh_signed_distance(grid_v.numpy(), mesh.vertices, mesh.faces)
    cavity = np.flatnonzero(region_of(grid_v.numpy(), mesh.vertices, mesh.faces, cell, signed) == CAVITY)
    sdf = torch.from_numpy(signed.astype(np.float32)).clamp(max=FAR_FIELD * cell)
    froth = torch.from_numpy(np.random.default_rng(args.seed).choice(cavity, int(args.froth * len(cavity)),
                                                                      replace=False))
    frothy = sdf.clone()
    frothy[froth] = -args.blob_depth * cell
    row = {"grid": grid, "cell": cell, "vertices": len(grid_v), "cavity_vertices": int(len(cavity)),
           "froth_vertices": int(len(froth)), "sdf_s": round(time.perf_counter() - start, 1), "stages": {}}
    raise_d = torch.zeros_like(sdf)
    raise_d[froth] = cell                                                      # shrink every blob
    h = args.fd_step
    for name in STAGES:
        with torch.no_grad():
            clean, froth_l, up, down = (float(scene.loss(x, grid_v, tets, name)) for x in
                                        (sdf, frothy, frothy + h * raise_d, frothy - h * raise_d))
        fd = (up - down) / (2 * h)
        st = {"loss_clean": clean, "loss_froth": froth_l, "excess_loss": froth_l - clean,
              "excess_per_froth_volume": (froth_l - clean) / (len(froth) * cell ** 3), "fd_restoring": fd}
        for method in args.antialias:
            x = frothy.clone().requires_grad_(True)
            t0 = time.perf_counter()
            scene.loss(x, grid_v, tets, name, method).backward()
            analytic = float((x.grad * raise_d).sum())
            st[method] = {"analytic_restoring": analytic, "captured": analytic / fd if fd else float("nan"),
                          "froth_pushed_out": float((x.grad[froth] < 0).float().mean()),
                          "backward_s": round(time.perf_counter() - t0, 1)}
        row["stages"][name] = st
        print(f"grid {grid} {name}: " + json.dumps(st), flush=True)
    return row


def table(result: dict, methods: list[str]) -> str:
    lines = [f"{'grid':>5} {'stage':<7} {'excess/vol':>11} {'fd':>10} " + " ".join(f"{m + ' captured':>16}"
                                                                                   for m in methods)]
    for row in result["grids"]:
        for name, st in row["stages"].items():
            lines.append(f"{row['grid']:>5} {name:<7} {st['excess_per_froth_volume']:>11.4g} "
                         f"{st['fd_restoring']:>10.4g} " + " ".join(f"{st[m]['captured']:>16.3f}" for m in methods))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("target", help="closed mesh with a hollow (e.g. bowl.obj of make_reference_meshes.py)")
    ap.add_argument("--config", default="configs/car_geometry.json")
    ap.add_argument("--grids", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--antialias", nargs="+", default=["pixel", "walk"], choices=("pixel", "walk"))
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--res", type=int, default=512, help="render side (the car config's is 512)")
    ap.add_argument("--froth", type=float, default=0.02, help="share of the hollow's vertices made solid")
    ap.add_argument("--blob-depth", type=float, default=2.0,
                    help="froth vertices' SDF, in cells below zero (2: blobs about a cell across; 0.5: a fifth)")
    ap.add_argument("--fd-step", type=float, default=0.1, help="finite-difference step, in cells of raise")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    res = f"train_res=[{args.res},{args.res}]"
    cfg = load_config(args.config, [res])
    mesh = trimesh.load(args.target, force="mesh", process=False)
    device = torch.device("cpu")
    ctx = raster.make_context(device, "torch")
    renderers = {m: NormalStageRenderer(load_config(args.config, [res, f"antialias={m}"]), ctx)
                 for m in {*args.antialias, "pixel"}}
    cams = sample_train_cameras(args.views, azimuth_sector(0, 1), camera_options(cfg),
                                torch.Generator().manual_seed(args.seed), device)
    tv = torch.from_numpy(np.asarray(mesh.vertices, np.float32))
    tf = torch.from_numpy(np.asarray(mesh.faces, np.int64))
    with torch.no_grad():
        targets = {n: latents(renderers["pixel"], tv, tf, cams, s) for n, s in stage_inputs(cfg).items()}
    scene = Scene(cfg, cams, renderers, targets)
    result = {"target": args.target, "config": args.config, "views": args.views, "res": args.res,
              "froth": args.froth, "fd_step_cells": args.fd_step, "blob_depth_cells": args.blob_depth,
              "far_field_cells": FAR_FIELD, "grids": [grid_case(args, g, mesh, scene) for g in args.grids]}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result, args.antialias))
    return 0


if __name__ == "__main__":
    sys.exit(main())
