"""How much of a surface one optimizer step's views leave unseen, split into surface that matches
the reference and extra surface (a floating plate, spongy fill): would a term on unseen area tell
them apart? (CPU; the next-step idea in README.md.)

    python docs/benchmarks/quality/session13/unseen_area.py MESH REF [key=value ...] [--steps 8]

A step is 32 training cameras (the car config's 8 GPUs x batch 4) over the whole circle; a face
is seen in a step when its id appears in one of the step's rasterized views (256^2). Extra = face
centroid farther than 2% of the reference's diagonal from the reference surface.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

from config import load_config  # noqa: E402
from dataset.cameras import sample_train_cameras  # noqa: E402
from render import raster  # noqa: E402
from scripts import evaluate as ev  # noqa: E402
from trainer import camera_options  # noqa: E402


def seen_faces(verts, faces, cams, ctx) -> torch.Tensor:
    """[F] bool: the face's id appears in one of the views."""
    pos = raster.clip_positions(verts, cams.mvp)
    rast, _ = raster.rasterize(ctx, pos, faces.to(torch.int32), cams.resolution)
    ids = rast[..., 3].long().flatten()
    seen = torch.zeros(faces.shape[0] + 1, dtype=torch.bool)
    seen[ids] = True
    return seen[1:]                                  # id 0 is the background


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mesh")
    ap.add_argument("ref")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--views", type=int, default=32)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args()
    cfg = load_config(ROOT / "configs" / "car_geometry.json", args.overrides)
    cam_opts = camera_options(cfg, [256, 256])
    out, ref = ev.load_surface(args.mesh), ev.load_surface(args.ref)
    tri = out.verts[out.faces]                                        # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    dist, _ = ev.directed_distances(tri.mean(1), ev.face_normals(out), ref)
    extra = dist > 0.02 * ref.diagonal
    ctx = raster.make_context(torch.device("cpu"), "auto")
    verts = torch.tensor(out.verts, dtype=torch.float32)
    faces = torch.tensor(out.faces, dtype=torch.int64)
    gen = torch.Generator().manual_seed(0)
    unseen_steps = np.zeros(len(area))
    for _ in range(args.steps):
        seen = torch.zeros(len(area), dtype=torch.bool)
        for start in range(0, args.views, 8):
            cams = sample_train_cameras(8, (-180.0, 180.0), cam_opts, gen, torch.device("cpu"))
            seen |= seen_faces(verts, faces, cams, ctx)
        unseen_steps += ~seen.numpy()
    frac = unseen_steps / args.steps                                  # per face: share of steps unseen

    def share(mask):   # area-weighted mean share of steps unseen, and the area's share of the mesh
        a = area[mask]
        return {"area_share": float(a.sum() / area.sum()),
                "unseen_per_step": float((frac[mask] * a).sum() / max(a.sum(), 1e-12)),
                "never_seen": float(a[frac[mask] == 1].sum() / max(a.sum(), 1e-12))}
    result = {"mesh": Path(args.mesh).name, "overrides": args.overrides, "steps": args.steps, "views": args.views,
              "all": share(np.ones_like(extra)), "matching": share(~extra), "extra": share(extra)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
