"""Compare an output mesh with a reference: geometry and image metrics, JSON out.

Usage:
    python scripts/evaluate.py OUTPUT_MESH REFERENCE_MESH [--out metrics.json] [--images auto]

Metrics (all from the reference's point of view where a scale is needed):
- ``chamfer``: symmetric L1 Chamfer distance, the mean of the two directed mean point-to-surface
  distances (output samples -> reference surface and back), divided by the length of the
  reference's bounding-box diagonal. Surface samples are area-uniform; distances are exact
  point-to-triangle distances (libigl), so a mesh compared with itself scores 0.
- ``chamfer_out_to_ref`` / ``chamfer_ref_to_out``: the two directed terms (accuracy / completeness).
- ``fscore``: F-score at a threshold of 1% of the diagonal (precision/recall of the samples).
- ``normal_consistency``: mean |n_sample . n_closest_face| over both directions (1 = perfect; the
  absolute value makes it independent of face orientation, as in Occupancy Networks).
- ``out_far``: the output samples farther than 2% of the diagonal from the reference, as a fraction
  and counted per height bin (where the surface the reference lacks sits).
- ``iou``: volumetric IoU on a regular grid over the union of both bounding boxes; inside means
  generalized winding number > 0.5 (libigl fast winding number), robust to small holes.
- ``psnr`` / ``ssim``: renders of both meshes at held-out views (a turntable at 20 degrees
  elevation, offset from the validation azimuths), black background, full images in [0, 1].
  ``--images normal`` compares world-space normal maps (geometry); ``albedo`` compares the kd
  texture looked up through the UVs (appearance); ``auto`` picks albedo when both meshes carry a
  kd texture, else normal; ``none`` skips rendering.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import igl
import numpy as np
import torch
import torch.nn.functional as F

PROJECT_ROOT = Path(__file__).resolve().parents[1]
if str(PROJECT_ROOT) not in sys.path:  # run as `python scripts/evaluate.py` from anywhere
    sys.path.insert(0, str(PROJECT_ROOT))

from dataset.cameras import CameraOptions, turntable_cameras  # noqa: E402
from render import raster  # noqa: E402
from render.mesh import MeshError, load_mesh  # noqa: E402
from render.normal_render import normal_to_display, render_normal_mask  # noqa: E402

IMAGE_KINDS = ("auto", "normal", "albedo", "none")


class EvaluateError(ValueError):
    """A mesh cannot be evaluated; the message names the file and the problem."""


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------
@dataclass
class Surface:
    verts: np.ndarray      # [V, 3] float64
    faces: np.ndarray      # [F, 3] int64
    name: str

    @property
    def diagonal(self) -> float:
        return float(np.linalg.norm(self.verts.max(0) - self.verts.min(0)))


def load_surface(path: str | Path) -> Surface:
    """Positions and triangles of any mesh render.mesh.load_mesh reads (scenes concatenated)."""
    try:
        mesh = load_mesh(path)
    except MeshError as e:
        raise EvaluateError(str(e)) from None
    return Surface(mesh.v_pos.double().numpy(), mesh.t_pos_idx.numpy().astype(np.int64), str(path))


def face_normals(s: Surface) -> np.ndarray:
    """[F, 3] unit normals (zero for degenerate faces)."""
    tri = s.verts[s.faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    length = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, length, out=np.zeros_like(n), where=length > 0)


def face_areas(s: Surface) -> np.ndarray:
    """[F] triangle areas."""
    tri = s.verts[s.faces]
    return 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)


def sample_surface(s: Surface, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """n area-uniform points on the surface and the unit normal of the face each lies on."""
    tri = s.verts[s.faces]
    area = face_areas(s)
    if not area.sum() > 0:
        raise EvaluateError(f"{s.name}: the mesh has zero surface area")
    face = rng.choice(len(area), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    # Uniform barycentrics: reflect the square's upper half into the triangle.
    flip = r1 + r2 > 1
    r1[flip], r2[flip] = 1 - r1[flip], 1 - r2[flip]
    t = tri[face]
    points = t[:, 0] + r1[:, None] * (t[:, 1] - t[:, 0]) + r2[:, None] * (t[:, 2] - t[:, 0])
    return points, face_normals(s)[face]


# ----------------------------------------------------------------------------------------------
# Geometry metrics
# ----------------------------------------------------------------------------------------------
def directed_distances(points: np.ndarray, normals: np.ndarray, target: Surface) -> tuple[np.ndarray, np.ndarray]:
    """Exact distance from each point to `target`'s surface, and |cos| between the point's normal
    and the closest face's normal."""
    sq, face, _ = igl.point_mesh_squared_distance(points, target.verts, target.faces)
    cos = np.abs((normals * face_normals(target)[face]).sum(1))
    return np.sqrt(np.maximum(sq, 0.0)), cos


def surface_metrics(out: Surface, ref: Surface, n_samples: int = 50_000, seed: int = 0,
                    fscore_threshold: float = 0.01) -> dict[str, float]:
    """Chamfer (both directions), F-score and normal consistency, normalized by ref's diagonal."""
    rng = np.random.default_rng(seed)
    diag = ref.diagonal
    p_out, n_out = sample_surface(out, n_samples, rng)
    p_ref, n_ref = sample_surface(ref, n_samples, rng)
    d_out, cos_out = directed_distances(p_out, n_out, ref)    # accuracy
    d_ref, cos_ref = directed_distances(p_ref, n_ref, out)    # completeness
    tau = fscore_threshold * diag
    precision, recall = float((d_out < tau).mean()), float((d_ref < tau).mean())
    fscore = 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)
    return {"chamfer": float(0.5 * (d_out.mean() + d_ref.mean()) / diag),
            "chamfer_out_to_ref": float(d_out.mean() / diag), "chamfer_ref_to_out": float(d_ref.mean() / diag),
            "fscore": fscore, "normal_consistency": float(0.5 * (cos_out.mean() + cos_ref.mean())),
            "reference_diagonal": diag}


FAR_THRESHOLD = 0.02   # out_far: output surface this far from the reference, x its diagonal, counts as extra


def far_output_by_height(out: Surface, ref: Surface, threshold: float = FAR_THRESHOLD, n_samples: int = 20_000,
                         bins: int = 10, seed: int = 0) -> dict:
    """Where the output has surface the reference lacks: the fraction of output samples farther than
    `threshold` x ref's diagonal from ref, and their count per height (y, up) bin over ref's extent.
    A false floor in a cavity or a membrane across a hole shows as a peak at its height."""
    rng = np.random.default_rng(seed)
    p_out, n_out = sample_surface(out, n_samples, rng)
    d_out, _ = directed_distances(p_out, n_out, ref)
    far = p_out[d_out > threshold * ref.diagonal]
    edges = np.linspace(ref.verts[:, 1].min(), ref.verts[:, 1].max(), bins + 1)
    counts = np.histogram(np.clip(far[:, 1], edges[0], edges[-1]), edges)[0]
    return {"threshold": threshold, "fraction": float(len(far) / n_samples),
            "y_bin_edges": np.round(edges, 4).tolist(), "counts": counts.tolist()}


def inside(s: Surface, points: np.ndarray) -> np.ndarray:
    """Generalized winding number > 0.5 (libigl's fast approximation)."""
    return igl.fast_winding_number(s.verts, s.faces, points) > 0.5


def volume_iou(out: Surface, ref: Surface, resolution: int = 96) -> float:
    """IoU of the two solids on a resolution^3 grid covering both bounding boxes (+2% margin)."""
    lo = np.minimum(out.verts.min(0), ref.verts.min(0))
    hi = np.maximum(out.verts.max(0), ref.verts.max(0))
    pad = 0.02 * (hi - lo).max()
    axes = [np.linspace(lo[i] - pad, hi[i] + pad, resolution) for i in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    a, b = inside(out, grid), inside(ref, grid)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


# ----------------------------------------------------------------------------------------------
# Image metrics
# ----------------------------------------------------------------------------------------------
def held_out_cameras(n_views: int, resolution: int, elevation_deg: float = 20.0):
    """n views around the object at `elevation_deg`, azimuths offset by half a step from the
    axis-aligned validation views; mean published fovy, no jitter."""
    opts = CameraOptions(fovy_range=(35.0, 35.0), camera_random_jitter=0.0, resolution=(resolution, resolution))
    cams = turntable_cameras(opts, "cpu", 2 * n_views, elevation_deg=elevation_deg)
    odd = torch.arange(1, 2 * n_views, 2)
    return type(cams)(**{k: (v[odd] if isinstance(v, torch.Tensor) else v) for k, v in vars(cams).items()})


def render_views(path: str | Path, kind: str, cams) -> "torch.Tensor":
    """[B, H, W, 3] in [0, 1], black background: normal map or albedo (kd through the UVs)."""
    mesh = load_mesh(path)
    ctx = raster.make_context("cpu", "torch")
    with torch.no_grad():
        if kind == "normal":
            img = render_normal_mask(ctx, mesh.v_pos, mesh.t_pos_idx, cams.mvp, cams.campos, cams.resolution)
            return normal_to_display(img)
        return _render_albedo(ctx, mesh, cams)


def _render_albedo(ctx, mesh, cams) -> "torch.Tensor":
    tri = mesh.t_pos_idx.to(torch.int32)
    pos = raster.clip_positions(mesh.v_pos, cams.mvp)
    rast, _ = raster.rasterize(ctx, pos, tri, cams.resolution, grad_db=False)
    uv, _ = raster.interpolate(mesh.v_tex.contiguous(), rast, mesh.t_tex_idx.to(torch.int32), backend=ctx)
    uv = torch.stack([uv[..., 0], 1.0 - uv[..., 1]], dim=-1).contiguous()   # OBJ v is bottom-up
    kd = mesh.material["kd"][..., :3].float().contiguous()[None]
    color = raster.texture(kd, uv, filter_mode="linear", boundary_mode="wrap", backend=ctx)
    color = color * (rast[..., 3:4] > 0).float()
    return raster.antialias(color.contiguous(), rast, pos, tri, backend=ctx).clamp(0, 1)


def has_albedo(path: str | Path) -> bool:
    mesh = load_mesh(path)
    return mesh.v_tex is not None and bool(mesh.material) and "kd" in mesh.material


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of images in [0, 1] (inf for identical images)."""
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(1.0 / mse)


def ssim(a: np.ndarray, b: np.ndarray, window: int = 11, sigma: float = 1.5) -> float:
    """Mean SSIM (Wang et al. 2004: Gaussian window 11 / 1.5, K1 0.01, K2 0.03) of [B, H, W, C]
    images in [0, 1], per channel, valid region only."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).permute(0, 3, 1, 2)
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).permute(0, 3, 1, 2)
    c = x.shape[1]
    g = torch.exp(-0.5 * ((torch.arange(window, dtype=torch.float64) - window // 2) / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, window, window).contiguous()
    blur = lambda t: F.conv2d(t, kernel, groups=c)                                  # noqa: E731
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def image_metrics(out_path: str | Path, ref_path: str | Path, kind: str = "auto", n_views: int = 8,
                  resolution: int = 256) -> dict[str, float | str]:
    if kind == "auto":
        kind = "albedo" if has_albedo(out_path) and has_albedo(ref_path) else "normal"
    if kind == "albedo":
        for p in (out_path, ref_path):
            if not has_albedo(p):
                raise EvaluateError(f"{p}: --images albedo needs UVs and a kd texture (map_Kd / baseColorTexture)")
    cams = held_out_cameras(n_views, resolution)
    a, b = render_views(out_path, kind, cams).numpy(), render_views(ref_path, kind, cams).numpy()
    return {"image_kind": kind, "views": n_views, "psnr": psnr(a, b), "ssim": ssim(a, b)}


# ----------------------------------------------------------------------------------------------
# Everything
# ----------------------------------------------------------------------------------------------
@dataclass
class EvalOptions:
    samples: int = 50_000
    iou_resolution: int = 96
    images: str = "auto"
    views: int = 8
    image_resolution: int = 256
    seed: int = 0


def evaluate(out_path: str | Path, ref_path: str | Path, opts: EvalOptions = EvalOptions()) -> dict:
    out, ref = load_surface(out_path), load_surface(ref_path)
    result: dict = {"output": str(out_path), "reference": str(ref_path), "options": asdict(opts)}
    result.update(surface_metrics(out, ref, opts.samples, opts.seed))
    result["out_far"] = far_output_by_height(out, ref, seed=opts.seed)
    result["iou"] = volume_iou(out, ref, opts.iou_resolution)
    if opts.images != "none":
        result.update(image_metrics(out_path, ref_path, opts.images, opts.views, opts.image_resolution))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Geometry and image metrics of an output mesh vs a reference.")
    parser.add_argument("output", help="mesh to evaluate (OBJ/PLY/STL/GLB/OFF)")
    parser.add_argument("reference", help="reference mesh (sets the scale: its bounding-box diagonal)")
    parser.add_argument("--out", help="write the JSON here (default: print it)")
    parser.add_argument("--samples", type=int, default=50_000, help="surface samples per mesh")
    parser.add_argument("--iou-resolution", type=int, default=96, help="IoU grid cells per side")
    parser.add_argument("--images", choices=IMAGE_KINDS, default="auto", help="what to render for PSNR/SSIM")
    parser.add_argument("--views", type=int, default=8, help="held-out views for PSNR/SSIM")
    parser.add_argument("--image-resolution", type=int, default=256, help="render size (square)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    opts = EvalOptions(args.samples, args.iou_resolution, args.images, args.views, args.image_resolution, args.seed)
    try:
        result = evaluate(args.output, args.reference, opts)
    except EvaluateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=2)  # inf PSNR is written as Infinity (identical images)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
