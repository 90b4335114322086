"""What a config's training cameras can see of a reference mesh, and the best IoU that implies.

    python scripts/visibility.py REF.obj --config configs/car_geometry.json [--cameras 512] [--out v.json]

The cameras are drawn exactly as training draws them (`trainer.camera_options(cfg)` and
`dataset.cameras.sample_train_cameras` over the whole azimuth circle: elevation, field of view and
look-at jitter from the config); the mesh stays where the file puts it, as the target guidance
renders it. For each camera the mesh's view depth is rasterized (the torch rasterizer on CPU,
nvdiffrast on CUDA). Reported:

- ``visible_area_fraction``: area-uniform surface samples seen by at least one camera (inside the
  image, facing it, not behind the depth buffer). Surface that no camera sees gives no signal to
  any guidance, normal/mask or RGB.
- ``carved_iou_bound``: space carving with those depth maps. A voxel outside the mesh is carved when
  some camera sees it in front of the surface (free space); the voxels left over are the mesh plus
  the pockets no camera looks into. Filling those pockets changes no training image, so an
  optimizer can leave them filled at no cost: |mesh| / |mesh + pockets| is the IoU it may end at
  however well it fits every view.
- ``carved_iou_bound_by_min_cameras``: the same bound when a voxel counts as carved only if at
  least k of the cameras see free space there (k = 1 is ``carved_iou_bound``): how well observed
  the free space is, not only whether it is.
- ``unseen_samples_bbox``: where the unseen samples lie.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import trimesh

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as `python scripts/visibility.py` from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

from config import ConfigError, load_config  # noqa: E402
from dataset.cameras import sample_train_cameras  # noqa: E402
from render import raster  # noqa: E402
from scripts.evaluate import EvaluateError, inside, load_surface, sample_surface  # noqa: E402
from trainer import camera_options  # noqa: E402


@dataclass
class VisibilityOptions:
    cameras: int = 512              # training cameras drawn
    resolution: int = 256           # depth-map side, pixels
    samples: int = 50_000           # surface samples for the visible fraction
    voxels: int = 96                # voxel grid side for the carving bound
    depth_tolerance: float = 0.01   # of the bounding-box diagonal: "at the surface" vs "behind it"
    seed: int = 0
    batch: int = 16                 # cameras rasterized together
    min_views: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)   # carving thresholds reported


def depth_maps(verts_vx3: torch.Tensor, faces_fx3: torch.Tensor, cams, ctx) -> torch.Tensor:
    """View depth [B, H, W] of the mesh for `cams` (inf where nothing is hit)."""
    pos = raster.clip_positions(verts_vx3, cams.mvp)                                # [B, V, 4]
    tri = faces_fx3.to(torch.int32)
    rast, _ = raster.rasterize(ctx, pos, tri, cams.resolution)
    w, _ = raster.interpolate(pos[..., 3:4].contiguous(), rast, tri, backend=ctx)   # clip w = view depth
    return torch.where(rast[..., 3] > 0, w[..., 0], torch.full_like(w[..., 0], float("inf")))


def project(points_px3: torch.Tensor, mvp_bx4x4: torch.Tensor, hw: tuple[int, int]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Points -> (pixel row [B, P], pixel column [B, P], view depth [B, P]); rows/columns outside the
    image are -1. Pixel centres as the rasterizer's (row 0 at clip y = -1)."""
    h, w = hw
    clip = torch.einsum("pi,bji->bpj", torch.cat([points_px3, torch.ones_like(points_px3[:, :1])], 1), mvp_bx4x4)
    depth = clip[..., 3]
    ndc = clip[..., :2] / depth.clamp(min=1e-9)[..., None]
    col = torch.floor((ndc[..., 0] * 0.5 + 0.5) * w).long()
    row = torch.floor((ndc[..., 1] * 0.5 + 0.5) * h).long()
    inside = (depth > 0) & (col >= 0) & (col < w) & (row >= 0) & (row < h)
    return torch.where(inside, row, -1), torch.where(inside, col, -1), depth


def lookup(depth_bxhxw: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """depth_bxhxw at (row, col) [B, P]; -inf where the point is outside the image."""
    b, h, w = depth_bxhxw.shape
    flat = depth_bxhxw.reshape(b, h * w)
    idx = (row.clamp(min=0) * w + col.clamp(min=0))
    got = torch.gather(flat, 1, idx)
    return torch.where(row >= 0, got, torch.full_like(got, -float("inf")))


def analyse(mesh_path: str | Path, config: str | Path, overrides: list[str] | None = None,
            opts: VisibilityOptions = VisibilityOptions(), device: str = "cpu") -> dict:
    cfg = load_config(config, overrides or [])
    cam_opts = camera_options(cfg, [opts.resolution, opts.resolution])
    surf = load_surface(mesh_path)
    dev = torch.device(device)
    ctx = raster.make_context(dev, "auto")
    verts = torch.tensor(surf.verts, dtype=torch.float32, device=dev)
    faces = torch.tensor(surf.faces, dtype=torch.int64, device=dev)
    lo, hi = surf.verts.min(0), surf.verts.max(0)
    diag = float(np.linalg.norm(hi - lo))
    tol = opts.depth_tolerance * diag

    rng = np.random.default_rng(opts.seed)
    pts, _ = sample_surface(surf, opts.samples, rng)
    pts_t = torch.tensor(pts, dtype=torch.float32, device=dev)
    # Voxel centres over the box grown by 5% (carving needs free space around the mesh).
    pad = 0.05 * (hi - lo)
    axes = [np.linspace(lo[k] - pad[k], hi[k] + pad[k], opts.voxels) for k in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    solid = inside(surf, grid)
    vox_t = torch.tensor(grid[~solid], dtype=torch.float32, device=dev)

    seen = torch.zeros(pts_t.shape[0], dtype=torch.bool, device=dev)
    carvers = torch.zeros(vox_t.shape[0], dtype=torch.int64, device=dev)   # cameras that carve each voxel
    gen = torch.Generator().manual_seed(opts.seed)
    for start in range(0, opts.cameras, opts.batch):
        cams = sample_train_cameras(min(opts.batch, opts.cameras - start), (-180.0, 180.0), cam_opts, gen, dev)
        depth = depth_maps(verts, faces, cams, ctx)
        hw = tuple(depth.shape[1:])
        row, col, d = project(pts_t, cams.mvp, hw)
        # No facing test: on a closed mesh a point seen from behind lies behind the front surface.
        seen |= ((row >= 0) & (d <= lookup(depth, row, col) + tol)).any(0)
        row, col, d = project(vox_t, cams.mvp, hw)
        carvers += ((row >= 0) & (d < lookup(depth, row, col) - tol)).sum(0)
    pockets = int((carvers == 0).sum())
    mesh_voxels = int(solid.sum())
    # A pocket that one grazing camera in thousands looks into is constrained about as weakly as one
    # that none does: the bound again when a voxel needs at least k cameras to count as carved.
    by_views = {str(k): mesh_voxels / (mesh_voxels + int((carvers < k).sum()))
                for k in opts.min_views if k <= opts.cameras}
    unseen = pts[~seen.cpu().numpy()]
    area = float(trimesh.Trimesh(surf.verts, surf.faces, process=False).area)
    return {"mesh": str(mesh_path), "config": str(config), "overrides": overrides or [],
            "options": opts.__dict__, "camera": {"elevation_range": list(cam_opts.elevation_range),
                                                  "fovy_range": list(cam_opts.fovy_range),
                                                  "camera_random_jitter": cam_opts.camera_random_jitter},
            "surface_area": area,
            "visible_area_fraction": float(seen.float().mean()),
            "unseen_samples_bbox": ([unseen.min(0).tolist(), unseen.max(0).tolist()] if len(unseen) else None),
            "mesh_voxels": mesh_voxels, "uncarved_outside_voxels": pockets,
            "carved_iou_bound": mesh_voxels / (mesh_voxels + pockets),
            "carved_iou_bound_by_min_cameras": by_views}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mesh")
    ap.add_argument("--config", required=True, help="training config whose camera distribution is used")
    ap.add_argument("--cameras", type=int, default=VisibilityOptions.cameras)
    ap.add_argument("--resolution", type=int, default=VisibilityOptions.resolution)
    ap.add_argument("--voxels", type=int, default=VisibilityOptions.voxels)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, as for train.py")
    args = ap.parse_intermixed_args(argv)      # overrides may follow the options
    if not Path(args.mesh).is_file():
        print(f"error: mesh {args.mesh!r} not found", file=sys.stderr)
        return 2
    opts = VisibilityOptions(cameras=args.cameras, resolution=args.resolution, voxels=args.voxels)
    try:
        result = analyse(args.mesh, args.config, args.overrides, opts, args.device)
    except (ConfigError, EvaluateError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    print(json.dumps({k: v for k, v in result.items() if k in ("visible_area_fraction", "carved_iou_bound",
                                                                 "carved_iou_bound_by_min_cameras",
                                                                 "unseen_samples_bbox")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
