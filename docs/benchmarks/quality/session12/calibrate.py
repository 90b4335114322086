"""Per-vertex forces of the guidance and of the smoothness terms on a trained cup that kept a table.

    python docs/benchmarks/quality/session12/calibrate.py MESH.ply [--cameras 32] [--res 512]

The guidance force is the target-mesh SDS gradient with respect to the vertices, per training
step (car_geometry: batch 4 per emulated GPU), at the mean SDS coefficient of each stage:
the injected latent gradient is c(t) (z - z*), with c = w(t) sqrt(a / (1 - a)), i.e.
sqrt(a (1 - a)) in the coarse stage and a sqrt(1 - a) in the fine stage, averaged over t in
the published range [0.02, 0.5]. It is averaged over `--cameras` published cameras (Adam's
first moment sees the average). The smoothness forces are the gradients of
geometry.smoothness's terms at weight 1. Printed by region (median |force| per vertex):
the cup's outer wall and rim, which images hold, and the table inside, which they barely see.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import trimesh

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))
from config import load_config  # noqa: E402
from dataset.cameras import sample_train_cameras  # noqa: E402
from geometry import smoothness  # noqa: E402
from guidance_target import pooled_latents, scaled_linear_alphas_cumprod  # noqa: E402
from phases import SURFACE_REGULARIZERS, NormalStageRenderer  # noqa: E402
from render import raster  # noqa: E402
from scripts.make_reference_meshes import cup_mesh  # noqa: E402
from trainer import camera_options  # noqa: E402

BATCH = 4   # car_geometry's cameras per (emulated) GPU and step


def mean_coefficients() -> dict[str, float]:
    a = scaled_linear_alphas_cumprod()[20:501].double()
    return {"geometry_coarse": float((a * (1 - a)).sqrt().mean()), "geometry_fine": float((a * (1 - a).sqrt()).mean())}


def regions(v: np.ndarray) -> dict[str, np.ndarray]:
    r, y = np.linalg.norm(v[:, [0, 2]], axis=1), v[:, 1]
    return {"outer wall": (r > 0.45) & (r < 0.6) & (y > -0.2) & (y < 0.2),
            "rim": y > 0.27,
            "table (r<0.3, -0.14<y<-0.02)": (r < 0.3) & (y > -0.14) & (y < -0.02),
            "floor under it (y<-0.15, r<0.3)": (r < 0.3) & (y < -0.15) & (y > -0.25)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mesh")
    ap.add_argument("--cameras", type=int, default=32)
    ap.add_argument("--res", type=int, default=512)
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs" / "car_geometry.json", [f"train_res=[{args.res},{args.res}]"])
    m = trimesh.load(args.mesh, force="mesh", process=False)
    verts = torch.tensor(np.asarray(m.vertices), dtype=torch.float32, requires_grad=True)   # [V, 3]
    faces = torch.tensor(np.asarray(m.faces), dtype=torch.int64)                           # [F, 3]
    ref = cup_mesh(128)
    ref_v = torch.tensor(np.asarray(ref.vertices), dtype=torch.float32)
    ref_f = torch.tensor(np.asarray(ref.faces), dtype=torch.int64)
    ctx = raster.make_context(torch.device("cpu"), "auto")
    renderer = NormalStageRenderer(cfg, ctx)
    cams = sample_train_cameras(args.cameras, (-180.0, 180.0), camera_options(cfg),
                                torch.Generator().manual_seed(0), "cpu")
    coef = mean_coefficients()
    forces = {}
    for stage in ("geometry_coarse", "geometry_fine"):
        latents = (lambda x: x) if stage == "geometry_coarse" else pooled_latents
        with torch.no_grad():
            target = latents(renderer(ref_v, ref_f, cams, stage))
        z = latents(renderer(verts, faces, cams, stage))
        # 0.5 c |z - z*|^2 summed over the cameras has the gradient c (z - z*): the SDS injection.
        loss = 0.5 * coef[stage] * ((z - target) ** 2).sum() * BATCH / args.cameras
        (g,) = torch.autograd.grad(loss, verts)
        forces[f"guidance {stage[9:]}"] = g.norm(dim=1).numpy()
    for name in SURFACE_REGULARIZERS:
        (g,) = torch.autograd.grad(getattr(smoothness, name)(verts, faces), verts)
        forces[name] = g.norm(dim=1).numpy()
    regs = regions(m.vertices)
    print(f"{args.mesh}: {verts.shape[0]} vertices, {args.cameras} cameras at {args.res}^2, "
          f"mean c: coarse {coef['geometry_coarse']:.3f}, fine {coef['geometry_fine']:.3f}")
    print(f"{'median |force| per vertex':34s}" + "".join(f"{k[:22]:>24s}" for k in regs))
    for name, f in forces.items():
        print(f"{name:34s}" + "".join(f"{np.median(f[mask]):24.3e}" for mask in regs.values()))
    print(f"{'vertices':34s}" + "".join(f"{int(mask.sum()):24d}" for mask in regs.values()))


if __name__ == "__main__":
    main()
