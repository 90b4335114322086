"""d loss / d floor height for the reference cup: autograd against central differences.

    python docs/benchmarks/quality/session11/floor_grad.py [--cameras 16] [--res 512] > floor_grad.txt

The cup's floor is raised by d: floor vertices move up by d, inner-wall vertices above them by
d * max(0, 1 - (y - floor) / 0.25), i.e. along the vertical wall, so the shape is a cup whose
floor is d higher, meeting the wall at a crease. The loss is the coarse stage's guidance input
(normal + mask latent) against the unraised cup's, summed squared, over published car cameras.
"smooth" renders as training does (interpolated vertex normals); "split" renders every face
with its own vertices (flat normals, every edge a silhouette for the antialiasing), the
reference for how much of the finite difference a rasterizer's gradient can carry.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402
from dataset.cameras import sample_train_cameras  # noqa: E402
from phases import NormalStageRenderer  # noqa: E402
from render import raster  # noqa: E402
from render.normal_render import render_normal_mask  # noqa: E402
from scripts.make_reference_meshes import cup_mesh  # noqa: E402
from trainer import camera_options  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cameras", type=int, default=16)
    ap.add_argument("--res", type=int, default=512)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "car_geometry.json", [f"train_res=[{args.res},{args.res}]"])
    m = cup_mesh(128)
    verts = torch.tensor(np.asarray(m.vertices), dtype=torch.float32)             # [V, 3]
    faces = torch.tensor(np.asarray(m.faces), dtype=torch.int64)                  # [F, 3]
    r, y = verts[:, [0, 2]].norm(dim=1), verts[:, 1]
    floor = y[(r < 0.2) & (y < 0.0) & (y > -0.2)].max()                          # the cavity floor's top
    inner = (r < 0.437) & (y > floor - 0.005)                                     # floor and inner wall
    lift = torch.where(inner, torch.clamp(1 - (y - floor) / 0.25, min=0.0), torch.zeros_like(y))[:, None]
    up = torch.tensor([0.0, 1.0, 0.0])
    ctx = raster.make_context(torch.device("cpu"), "auto")
    cams = sample_train_cameras(args.cameras, (-180.0, 180.0), camera_options(cfg),
                                torch.Generator().manual_seed(0), "cpu")
    renderer = NormalStageRenderer(cfg, ctx)

    def render(v: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "smooth":
            return renderer(v, faces, cams, "geometry_coarse")
        vs = v[faces].reshape(-1, 3)                                              # [3F, 3]
        fs = torch.arange(vs.shape[0]).reshape(-1, 3)
        img = render_normal_mask(ctx, vs, fs, cams.mvp, cams.campos, cams.resolution, cams.normal_rotate,
                                 cfg.if_flip_the_normal)
        return renderer._stage_input(img, True)

    print(f"floor y {float(floor):.3f}, {int((lift > 0).sum())} of {verts.shape[0]} vertices moved, "
          f"{args.cameras} cameras at {args.res}^2")
    print(f"{'render':7s} {'d':>5s} {'loss':>9s} {'autograd':>10s} {'fd h=0.004':>11s} {'fd h=0.008':>11s}")
    for mode in ("smooth", "split"):
        with torch.no_grad():
            target = render(verts, mode)

        def loss(d: torch.Tensor) -> torch.Tensor:
            return ((render(verts + d * lift * up, mode) - target) ** 2).sum()

        for d0 in (0.05, 0.1):
            d = torch.tensor(d0, requires_grad=True)
            value = loss(d)
            (grad,) = torch.autograd.grad(value, d)
            with torch.no_grad():
                fd = [float(loss(torch.tensor(d0 + h)) - loss(torch.tensor(d0 - h))) / (2 * h) for h in (0.004, 0.008)]
            print(f"{mode:7s} {d0:5.2f} {float(value.detach()):9.3f} {float(grad):10.1f} {fd[0]:11.1f} {fd[1]:11.1f}")


if __name__ == "__main__":
    main()
