"""SDF initialization: init shapes, training samples and the SDF pretraining loop
(docs/DESIGN.md, "Conventions and formulas").

Shapes (sdf < 0 inside), before the transform:
- "ellipsoid":   the unit sphere (scaled per axis by the transform into an ellipsoid);
- "cylinder":    radius 0.75, height 0.8, axis along z (z in [-0.4, 0.4]), as the published code's
                 Open3D cylinder; rotate it with sdf_init_shape_rotate_x to make it stand on y;
- "custom_mesh": a user mesh (any render.mesh.load_mesh format), centred on its vertex mean and
                 scaled so its farthest vertex lies on the unit sphere.
Transform, in this order: per-axis `sdf_init_shape_scale`, rotation about x by
`sdf_init_shape_rotate_x` degrees (right-handed: +90 maps +y to +z), then `translation_y` and
`translation_z`. Signed distances are analytic for the ellipsoid and cylinder (exact zero set,
approximate distance away from it under non-uniform scale) and come from libigl with the
(fast) generalized winding number sign for meshes, which stays correct on open or non-manifold meshes.
"""
from __future__ import annotations

import contextlib
import logging
import math
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import igl
import numpy as np
import torch
import trimesh

import faults
import progress
from geometry.hashgrid import published_adamw
from geometry.tet_grid import tet_cell
from render.mesh import load_mesh, unit_size

log = logging.getLogger(__name__)

SHAPES = ("ellipsoid", "cylinder", "custom_mesh")
CYLINDER_RADIUS = 0.75
CYLINDER_HEIGHT = 0.8
JITTER_SIGMA = 0.05


class SdfInitError(ValueError):
    """Invalid or degenerate SDF initialization input."""


class SdfInitWarning(UserWarning):
    """Suspicious SDF initialization input (e.g. the shape sticks out of the grid box)."""


@dataclass(frozen=True)
class InitShapeOptions:
    shape: str = "ellipsoid"  # sdf_init_shape
    scale: tuple[float, float, float] = (1.0, 1.0, 1.0)  # sdf_init_shape_scale
    rotate_x_deg: float = 0.0  # sdf_init_shape_rotate_x
    translation_y: float = 0.0
    translation_z: float = 0.0
    base_mesh: str | Path | None = None  # required for custom_mesh

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SdfInitError(f"sdf_init_shape: expected one of {SHAPES}; got {self.shape!r}")
        scale = tuple(self.scale) if isinstance(self.scale, (list, tuple)) else None
        if scale is None or len(scale) != 3 or not all(
                isinstance(s, (int, float)) and math.isfinite(s) and s > 0 for s in scale):
            raise SdfInitError(f"sdf_init_shape_scale: expected 3 positive finite numbers; "
                               f"got {self.scale!r}")
        object.__setattr__(self, "scale", tuple(float(s) for s in scale))
        for name in ("rotate_x_deg", "translation_y", "translation_z"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SdfInitError(f"{_KEY[name]}: expected a finite number; got {value!r}")
        if self.shape == "custom_mesh" and not self.base_mesh:
            raise SdfInitError("sdf_init_shape 'custom_mesh' needs 'base_mesh' (a mesh file path); "
                               "got none")


_KEY = {"rotate_x_deg": "sdf_init_shape_rotate_x", "translation_y": "translation_y",
        "translation_z": "translation_z"}


def rotation_x(deg: float) -> np.ndarray:
    """[3, 3] right-handed rotation about +x (column-vector convention)."""
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)


class InitShape:
    """The transformed init shape in world units: signed distance and surface samples."""

    def __init__(self, opts: InitShapeOptions) -> None:
        self.opts = opts
        self.scale = np.asarray(opts.scale, dtype=np.float64)
        self.rot = rotation_x(opts.rotate_x_deg)
        self.shift = np.array([0.0, opts.translation_y, opts.translation_z])
        # A triangle mesh of the shape (world units) for area-uniform surface samples and the
        # signed distance of custom meshes.
        local_v, self.faces = _local_mesh(opts)
        self.verts = self.to_world(local_v)

    def to_world(self, p_local_nx3: np.ndarray) -> np.ndarray:
        return (p_local_nx3 * self.scale) @ self.rot.T + self.shift

    def to_local(self, p_world_nx3: np.ndarray) -> np.ndarray:
        return ((p_world_nx3 - self.shift) @ self.rot) / self.scale

    def sdf(self, p_world_nx3: np.ndarray) -> np.ndarray:
        """Signed distance [N] (float64), negative inside."""
        p = np.asarray(p_world_nx3, dtype=np.float64)
        if self.opts.shape == "ellipsoid":
            return _ellipsoid_sdf((p - self.shift) @ self.rot, self.scale)
        if self.opts.shape == "cylinder":
            # Distance in the unscaled frame times the smallest scale: exact zero set, and a
            # lower bound of the true distance (so never overshoots) under non-uniform scale.
            return _cylinder_sdf(self.to_local(p)) * self.scale.min()
        return mesh_signed_distance(p, self.verts, self.faces)

    def sample_surface(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """[n, 3] area-uniform points on the (world) surface."""
        tri = self.verts[self.faces]  # [F, 3, 3]
        area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
        face = rng.choice(len(area), size=n, p=area / area.sum())
        u, v = rng.random((2, n))
        flip = u + v > 1  # fold the unit square onto the triangle
        u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
        t = tri[face]
        return t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + v[:, None] * (t[:, 2] - t[:, 0])


def mesh_signed_distance(p_nx3: np.ndarray, verts_vx3: np.ndarray, faces_fx3: np.ndarray
                         ) -> np.ndarray:
    """libigl signed distance with the (fast, hierarchical) generalized winding-number sign, robust
    to open meshes; fast because the pretraining queries ~10k points per step."""
    s, *_ = igl.signed_distance(np.ascontiguousarray(p_nx3, dtype=np.float64),
                                np.ascontiguousarray(verts_vx3, dtype=np.float64),
                                np.ascontiguousarray(faces_fx3, dtype=np.int64),
                                sign_type=igl.SIGNED_DISTANCE_TYPE_FAST_WINDING_NUMBER)
    return s


def _ellipsoid_sdf(q_nx3: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Ellipsoid distance estimate k0 (k0 - 1) / k1 (exact for spheres, exact zero set)."""
    k0 = np.linalg.norm(q_nx3 / radii, axis=1)
    k1 = np.linalg.norm(q_nx3 / radii ** 2, axis=1)
    safe = k1 > 1e-12
    return np.where(safe, k0 * (k0 - 1) / np.where(safe, k1, 1.0), -radii.min())


def _cylinder_sdf(q_nx3: np.ndarray) -> np.ndarray:
    """Exact signed distance to the capped cylinder (axis z, radius 0.75, height 0.8)."""
    d = np.stack([np.linalg.norm(q_nx3[:, :2], axis=1) - CYLINDER_RADIUS,
                  np.abs(q_nx3[:, 2]) - CYLINDER_HEIGHT / 2], axis=1)
    inside = np.minimum(d.max(axis=1), 0.0)
    outside = np.linalg.norm(np.maximum(d, 0.0), axis=1)
    return inside + outside


def _local_mesh(opts: InitShapeOptions) -> tuple[np.ndarray, np.ndarray]:
    if opts.shape == "ellipsoid":
        m = trimesh.creation.icosphere(subdivisions=4, radius=1.0)
        return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)
    if opts.shape == "cylinder":
        m = trimesh.creation.cylinder(radius=CYLINDER_RADIUS, height=CYLINDER_HEIGHT, sections=64)
        return np.asarray(m.vertices, dtype=np.float64), np.asarray(m.faces, dtype=np.int64)
    return load_unit_mesh(opts.base_mesh)


def load_unit_mesh(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """User mesh centred on its vertex mean and scaled into the unit sphere: (verts, faces)."""
    mesh = unit_size(load_mesh(path))  # MeshError for missing/corrupt/empty/NaN files
    verts = mesh.v_pos.detach().cpu().double().numpy()
    faces = mesh.t_pos_idx.detach().cpu().numpy().astype(np.int64)
    if not np.isfinite(verts).all():
        raise SdfInitError(f"base_mesh '{path}': vertex positions contain NaN or inf")
    used = verts[np.unique(faces)]
    extent = np.linalg.svd(used - used.mean(0), compute_uv=False)  # spread along principal axes
    if extent[-1] < 1e-6 * extent[0]:
        raise SdfInitError(
            f"base_mesh '{path}': all vertices lie on a plane (thickness "
            f"{extent[-1] / extent[0]:.1e} of its size), so it encloses no volume and its SDF has "
            "no inside; give a solid mesh (or thicken the surface) for sdf_init_shape custom_mesh")
    return verts, faces


# ----------------------------------------------------------------------------------------------
# Training samples
# ----------------------------------------------------------------------------------------------

def check_shape_in_grid(shape: InitShape, mesh_scale: float, grid_res: int | None = None) -> None:
    """Error if the transformed shape misses the grid box, warning if it sticks out or is tiny."""
    half = 0.5 * mesh_scale
    lo, hi = shape.verts.min(0), shape.verts.max(0)
    settings = (f"sdf_init_shape_scale={list(shape.opts.scale)}, translation_y="
                f"{shape.opts.translation_y}, translation_z={shape.opts.translation_z}, "
                f"mesh_scale={mesh_scale}")
    if np.any(lo >= half) or np.any(hi <= -half):
        raise SdfInitError(f"the init shape (bounds {lo.round(3).tolist()} .. "
                           f"{hi.round(3).tolist()}) lies entirely outside the grid box "
                           f"[-{half}, {half}]^3 ({settings}); reduce the translation or raise "
                           "mesh_scale")
    overshoot = float(max(np.max(hi - half), np.max(-half - lo)))
    if overshoot > 0:
        warnings.warn(f"the init shape sticks out of the grid box [-{half}, {half}]^3 by "
                      f"{overshoot:.3f} ({settings}); the part outside is cut off - use "
                      f"mesh_scale >= {2 * (half + overshoot):.2f} or a smaller scale",
                      SdfInitWarning, stacklevel=2)
    if grid_res is not None:
        cell = tet_cell(grid_res, mesh_scale)
        if float((hi - lo).min()) < 2 * cell:
            warnings.warn(f"the init shape is thinner ({float((hi - lo).min()):.3f}) than two tet "
                          f"grid cells ({2 * cell:.3f}) on the tet grid {grid_res} ({settings}); "
                          "it may vanish - use a larger scale or a finer grid (dmtet_grid; dmtet_grid_coarse "
                          "caps the coarse stage's)",
                          SdfInitWarning, stacklevel=2)


def sample_sdf_batch(shape: InitShape, mesh_scale: float, n_surface: int, n_near: int, n_uniform: int,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(points [N, 3], sdf [N]) float64 in this order: surface points (sdf 0), surface points
    jittered by N(0, JITTER_SIGMA) and uniform points in the grid box [-0.5, 0.5]^3 * mesh_scale."""
    surface = shape.sample_surface(n_surface + n_near, rng)
    near = surface[n_surface:] + rng.normal(0.0, JITTER_SIGMA, (n_near, 3))
    uniform = (rng.random((n_uniform, 3)) - 0.5) * mesh_scale
    points = np.concatenate([surface[:n_surface], near, uniform])
    sdf = np.concatenate([np.zeros(n_surface), shape.sdf(points[n_surface:])])   # surface: 0 by construction
    if not np.isfinite(sdf).all():
        raise SdfInitError(f"SDF targets contain {int((~np.isfinite(sdf)).sum())} non-finite "
                           f"values for init shape {shape.opts.shape!r}")
    return points, sdf


def _warn_if_empty(sdf_uniform: np.ndarray) -> None:
    if len(sdf_uniform) and not (sdf_uniform < 0).any():
        warnings.warn("no uniform sample of the grid box is inside the init shape; the "
                      "pretrained SDF will likely be empty - check the init scale and translation",
                      SdfInitWarning, stacklevel=3)


def make_training_samples(shape: InitShape, mesh_scale: float, n_surface: int = 10_000,
                          n_near: int = 40_000, n_uniform: int = 50_000, seed: int = 0
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed sample set (points [N, 3] float32, sdf [N] float32), see sample_sdf_batch."""
    points, sdf = sample_sdf_batch(shape, mesh_scale, n_surface, n_near, n_uniform, np.random.default_rng(seed))
    _warn_if_empty(sdf[n_surface + n_near:])
    return torch.from_numpy(points).float(), torch.from_numpy(sdf).float()


# ----------------------------------------------------------------------------------------------
# Pretraining
# ----------------------------------------------------------------------------------------------

# A pretraining that ends above this mse (rms 1.2 cm in the published 2.3-unit box, about a third
# of a grid-128 cell) has fitted the initial shape loosely. From such a start a smooth coarse SDF
# can vanish in the first SDS steps before the target's thin parts form; the published 400 steps
# end near or above it, while 2000 steps end 20-450x lower, hence sdf_init_iter's default
# (docs/RESULTS.md, "SDF pretraining").
LOOSE_FIT_MSE = 1.5e-4
PROGRESS_EVERY = 50   # pretraining steps between the progress bar's mse readings


def check_pretraining_fit(mse: float, iters: int) -> None:
    """Warn (SdfInitWarning) when the pretraining's final mse says the init shape is fitted loosely."""
    if mse > LOOSE_FIT_MSE:
        warnings.warn(f"SDF pretraining ended at mse {mse:.2e} after {iters} steps (above {LOOSE_FIT_MSE:.1e}): "
                      "the initial shape is fitted loosely, and a loose start can vanish in the first SDS "
                      f"steps; raise sdf_init_iter (e.g. {max(2000, 5 * iters)})", SdfInitWarning, stacklevel=2)


def pretrain_sdf(geometry, shape: InitShape, iters: int = 2000, batch_size: int = 10_240,
                 lr: float = 1e-3, seed: int = 0, samples: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> float:
    """Regress the SDF channel of `geometry` (a DMTetGeometry) to the init shape's signed distance
    (MSE) for `iters` steps of AdamW; returns the mean loss of the last 10 batches (check it with
    check_pretraining_fit).

    Each step draws a fresh batch (sample_sdf_batch: 10% surface, 40% near it, 50% uniform), as the
    published code does. A fixed sample set (`samples`, or the 100k points this function once
    used) is memorized by the hash grid's fine levels: at grid 128 with all 16 levels, 400 steps
    on 100k points fitted them to mse 5e-6 while fresh points saw 1e-2, and 14k grid vertices
    farther than a cell from the ellipsoid had the wrong sign (hollow, fragmented starts; 0 with
    fresh batches). Since every batch is new, the returned mse
    measures the fit between samples too.

    The deformation channel is left alone (it starts near zero). The optimizer is local: the
    trainer builds its own for the SDS phase afterwards.
    """
    if iters < 1 or batch_size < 1:
        raise ValueError(f"pretrain_sdf: 'iters' and 'batch_size' must be >= 1; got {iters}, "
                         f"{batch_size}")
    check_shape_in_grid(shape, geometry.mesh_scale, geometry.grid_res)
    device = geometry.grid_verts.device
    gen = torch.Generator(device="cpu").manual_seed(seed)
    rng = np.random.default_rng(seed)
    n_surface, n_near = batch_size // 10, 4 * batch_size // 10
    n_uniform = batch_size - n_surface - n_near

    def batch(it: int) -> tuple[torch.Tensor, torch.Tensor]:
        if samples is not None:
            idx = torch.randint(0, samples[0].shape[0], (batch_size,), generator=gen)
            return samples[0][idx].to(device), samples[1][idx].to(device)
        points, sdf = sample_sdf_batch(shape, geometry.mesh_scale, n_surface, n_near, n_uniform, rng)
        if it == 0:
            _warn_if_empty(sdf[n_surface + n_near:])
        return torch.from_numpy(points).float().to(device), torch.from_numpy(sdf).float().to(device)

    params = [p for p in geometry.sdf_net.parameters() if p.requires_grad]
    # The published optimizer (the SDS phase's too). What makes the fit tight is the step count,
    # not the optimizer: Adam's defaults end within a few times AdamW's mse after 400 and after
    # 2000 steps, and both fall far under LOOSE_FIT_MSE by 2000.
    optimizer = published_adamw(params, lr)
    loss = torch.zeros(())
    last: deque[torch.Tensor] = deque(maxlen=10)                     # the last 10 batch losses (device)
    # Minutes at the default 2000 steps on a CPU: a bar with the mse and the time left.
    with contextlib.closing(progress.bar(iters, "SDF pretraining", unit="step", show_at_once=True)) as bar:
        for it in range(iters):
            faults.point("pretrain", it + 1)
            points, target = batch(it)
            sdf, _ = geometry.sdf_net(points)
            loss = torch.nn.functional.mse_loss(sdf, target)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"SDF pretraining loss became {loss.item()} at step {it}; "
                                         f"lower the pretraining lr ({lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last.append(loss.detach())
            if it % PROGRESS_EVERY == 0 or it == iters - 1:   # reading the loss waits for the device
                mse = loss.item()
                bar.set_postfix(mse=f"{mse:.2e}", refresh=False)
                log.info("SDF pretraining %d/%d: mse %.3e", it + 1, iters, mse)
            bar.update(1)
    return float(torch.stack(list(last)).mean())
