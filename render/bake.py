"""Bake a material (a function of surface points) into UV texture maps.

The mesh is rasterized in UV space (clip position = (uv * 2 - 1, 0, 1)) at the texture
resolution, so every covered texel centre gets the world position of the surface point it maps
to; the material is evaluated there. Texels outside the UV islands are then filled by OpenCV
inpainting so that bilinear filtering and mip-mapping at island borders do not pull in
background colour ("UV padding").

Orientation: the returned maps are images (row 0 = top = v 1), the same as PNG files and as
`render.mesh` stores textures; look them up at (u, 1 - v). The rasterizer's row 0 is v = 0,
so its output is flipped once here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import contextlib

import cv2
import numpy as np
import torch
from torch import Tensor

import progress
from render import raster
from render.mesh import Mesh, MeshError, validate_mesh

# points [N, 3] -> {"kd": [N, 3], "ks": [N, 3], "nrm": [N, 3]}
MaterialFn = Callable[[Tensor], dict[str, Tensor]]
MAP_NAMES = ("kd", "ks", "nrm")


class BakeError(RuntimeError):
    """The material or the mesh produced something that cannot be baked."""


@dataclass
class BakedMaps:
    """Baked texture maps in image orientation (row 0 = top = v 1), float32 on the mesh device."""
    kd: Tensor      # [H, W, 3] linear albedo in [0, 1]
    ks: Tensor      # [H, W, 3] (occlusion, roughness, metallic) in [0, 1]
    nrm: Tensor     # [H, W, 3] tangent-space normal, unit length, z >= 0
    mask: Tensor    # [H, W] bool: texel centre covered by a triangle (before padding)

    @property
    def resolution(self) -> tuple[int, int]:
        return int(self.kd.shape[0]), int(self.kd.shape[1])

    def as_material(self) -> dict[str, Tensor]:
        """The `Mesh.material` dict (keys kd, ks, normal) for rendering the baked mesh."""
        return {"kd": self.kd, "ks": self.ks, "normal": self.nrm}


def _resolution(texture_res: int | tuple[int, int]) -> tuple[int, int]:
    res = (texture_res, texture_res) if isinstance(texture_res, int) else tuple(texture_res)
    if len(res) != 2 or any(int(r) != r or r < 8 for r in res):
        raise ValueError(f"bake: texture_res must be an int or (H, W) of ints >= 8, got {texture_res!r}")
    return int(res[0]), int(res[1])


def rasterize_uv(mesh: Mesh, resolution: tuple[int, int],
                 ctx: raster.RasterContext | None = None) -> tuple[Tensor, Tensor]:
    """World position per texel centre. Returns (pos [H, W, 3], covered [H, W] bool), image rows.

    Uses one rasterizer vertex per face corner, so a UV vertex shared by faces with different
    positions (allowed by separate index buffers) still gets the right position on each face.
    """
    if mesh.v_tex is None or mesh.t_tex_idx is None:
        raise MeshError("bake: mesh has no UVs (v_tex/t_tex_idx is None); run render.uv.unwrap first")
    validate_mesh(mesh, "bake(mesh)")
    device = mesh.v_pos.device
    ctx = ctx if ctx is not None else raster.make_context(device)
    num_f = mesh.t_pos_idx.shape[0]
    uv_cx2 = mesh.v_tex[mesh.t_tex_idx.reshape(-1)].float()              # [3F, 2] per corner
    pos_cx3 = mesh.v_pos[mesh.t_pos_idx.reshape(-1)].float()             # [3F, 3]
    clip_1cx4 = torch.cat([uv_cx2 * 2.0 - 1.0,
                           torch.zeros_like(uv_cx2[:, :1]),
                           torch.ones_like(uv_cx2[:, :1])], dim=-1)[None]  # [1, 3F, 4]
    tri_fx3 = torch.arange(3 * num_f, dtype=torch.int32, device=device).reshape(num_f, 3)
    rast_1hw4, _ = raster.rasterize(ctx, clip_1cx4, tri_fx3, resolution, grad_db=False)
    pos_1hw3, _ = raster.interpolate(pos_cx3[None], rast_1hw4, tri_fx3)
    # Rasterizer row 0 is NDC y = -1 = v 0 (bottom of the image): flip to image rows.
    pos_hw3 = pos_1hw3[0].flip(0)
    covered_hw = (rast_1hw4[0, ..., 3] > 0).flip(0)
    return pos_hw3, covered_hw


def _evaluate(material_fn: MaterialFn, points_nx3: Tensor, chunk: int) -> dict[str, Tensor]:
    """Material at the points, in chunks to bound memory; checks keys, shapes and finiteness."""
    outs: dict[str, list[Tensor]] = {k: [] for k in MAP_NAMES}
    with torch.no_grad():
        for start in range(0, points_nx3.shape[0], chunk):
            pts = points_nx3[start:start + chunk]
            result = material_fn(pts)
            for key in MAP_NAMES:
                if key not in result:
                    raise BakeError(f"bake: material_fn must return keys {MAP_NAMES}, got "
                                    f"{sorted(result)} (missing '{key}')")
                value = result[key]
                if tuple(value.shape) != (pts.shape[0], 3):
                    raise BakeError(f"bake: material_fn['{key}'] must be [N={pts.shape[0]}, 3], "
                                    f"got {tuple(value.shape)}")
                outs[key].append(value.float())
    merged = {k: torch.cat(v) for k, v in outs.items()}
    for key, value in merged.items():
        bad = int((~torch.isfinite(value)).any(dim=-1).sum())
        if bad:
            raise BakeError(f"bake: material_fn['{key}'] is NaN/inf at {bad} of {value.shape[0]} "
                            "surface points; the material network has diverged (check its "
                            "training losses) - refusing to bake non-finite texels")
    return merged


def _tile_bounds(size: int, blocks: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, size, blocks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


# OpenCV's Telea fill on float32 input rounds intermediate values to integers (a known-constant
# 0.75 region comes back as a +-1 checkerboard), so each channel is mapped affinely onto
# [0, _INPAINT_SCALE] before inpainting and back afterwards; 2^16 levels keep the error < 1e-4.
_INPAINT_SCALE = 65535.0


def _inpaint_channel(tile_hw: np.ndarray, known_hw: np.ndarray, hole_u8: np.ndarray,
                     radius: float) -> np.ndarray:
    """Telea-inpaint one float channel; the result is clamped to the known texels' range."""
    lo, hi = float(tile_hw[known_hw].min()), float(tile_hw[known_hw].max())
    if hi - lo < 1e-12:
        return np.full_like(tile_hw, lo)
    scaled = np.ascontiguousarray((tile_hw - lo) * (_INPAINT_SCALE / (hi - lo)), dtype=np.float32)
    filled = cv2.inpaint(scaled, hole_u8, radius, cv2.INPAINT_TELEA)
    # Telea extends each texel to first order (value + gradient * offset), which can overshoot
    # at sharp island corners; the known range bounds it.
    filled = np.clip(filled, 0.0, _INPAINT_SCALE) * ((hi - lo) / _INPAINT_SCALE) + lo
    return np.where(known_hw, tile_hw, filled)


def uv_padding(image_hwc: np.ndarray, known_hw: np.ndarray, blocks: int,
               radius: float = 3.0, on_tile: Callable[[], object] | None = None) -> np.ndarray:
    """Fill unknown texels with OpenCV Telea inpainting, per channel in float32.

    The image is cut into blocks x blocks tiles that are inpainted independently (the
    published `uv_padding_block`): the fast-marching fill's cost grows faster than linearly with
    the hole size, and colours only need to propagate a few texels past the island borders.
    Tiles without any known texel (empty atlas corners, never sampled by a triangle) get the
    mean of all known texels. Known texels are returned unchanged. `on_tile` is called after each
    tile (progress).
    """
    if image_hwc.ndim != 3 or known_hw.shape != image_hwc.shape[:2]:
        raise ValueError(f"uv_padding: image must be [H, W, C] and mask [H, W], got "
                         f"{image_hwc.shape} and {known_hw.shape}")
    if blocks < 1:
        raise ValueError(f"uv_padding: uv_padding_block must be >= 1, got {blocks}")
    if not known_hw.any():
        raise BakeError("uv_padding: no texel is covered by the mesh; are the UVs inside [0, 1]^2?")
    src = np.ascontiguousarray(image_hwc, dtype=np.float32)
    out = src.copy()
    global_mean_c = src[known_hw].mean(axis=0)
    for y0, y1 in _tile_bounds(src.shape[0], blocks):
        for x0, x1 in _tile_bounds(src.shape[1], blocks):
            _pad_tile(src[y0:y1, x0:x1], known_hw[y0:y1, x0:x1], out[y0:y1, x0:x1], global_mean_c, radius)
            if on_tile is not None:
                on_tile()
    return out


def _pad_tile(src_hwc: np.ndarray, known_hw: np.ndarray, out_hwc: np.ndarray, mean_c: np.ndarray,
              radius: float) -> None:
    """uv_padding of one tile, written into `out_hwc` (a view of the output)."""
    if known_hw.all():
        return
    if not known_hw.any():
        out_hwc[:] = mean_c
        return
    hole_u8 = np.where(known_hw, 0, 255).astype(np.uint8)
    for c in range(src_hwc.shape[2]):
        out_hwc[..., c] = _inpaint_channel(src_hwc[..., c], known_hw, hole_u8, radius)


def normalize_normal_map(nrm_hw3: Tensor) -> Tensor:
    """Force z >= 0 and unit length; (0, 0, 1) where the vector vanishes after clamping z.

    Shading uses max(n.z, 0) and normalizes the perturbed normal, so this changes no shading of
    covered texels; it makes the stored map a valid tangent-space normal map for other tools.
    """
    nrm = torch.cat([nrm_hw3[..., :2], nrm_hw3[..., 2:].clamp(min=0.0)], dim=-1)
    length = nrm.norm(dim=-1, keepdim=True)
    flat = torch.tensor([0.0, 0.0, 1.0], dtype=nrm.dtype, device=nrm.device).expand_as(nrm)
    return torch.where(length > 1e-6, nrm / length.clamp(min=1e-6), flat)


def bake(mesh: Mesh, material_fn: MaterialFn, texture_res: int | tuple[int, int] = 1024,
         uv_padding_block: int = 4, inpaint_radius: float = 3.0,
         ctx: raster.RasterContext | None = None, chunk: int = 1 << 18) -> BakedMaps:
    """Bake `material_fn` over the mesh's UV atlas into kd/ks/nrm maps with UV padding.

    Uses the mesh's own UVs (not a fresh unwrap): the normal perturbation was learned in the
    tangent frame of these UVs, and a different atlas would rotate it.
    """
    resolution = _resolution(texture_res)
    pos_hw3, covered_hw = rasterize_uv(mesh, resolution, ctx)
    if not bool(covered_hw.any()):
        raise BakeError(f"bake: no texel of the {resolution} atlas is covered; the UVs "
                        f"(range {mesh.v_tex.min().item():.3g}..{mesh.v_tex.max().item():.3g}) "
                        "must lie in [0, 1]^2")
    values = _evaluate(material_fn, pos_hw3[covered_hw], chunk)
    known_hw = covered_hw.cpu().numpy()
    device = mesh.v_pos.device
    maps: dict[str, Tensor] = {}
    # The inpainting dominates at large texture_res (minutes at 4096 on a CPU): a bar over its tiles.
    tiles = len(MAP_NAMES) * max(uv_padding_block, 1) ** 2
    with contextlib.closing(progress.bar(tiles, "baking textures", unit="tile")) as bar:
        for key in MAP_NAMES:
            full_hw3 = torch.zeros(*resolution, 3, dtype=torch.float32, device=device)
            full_hw3[covered_hw] = values[key]
            if key == "nrm":
                # Unit vectors before filling so inpainting averages directions, not lengths.
                full_hw3 = normalize_normal_map(full_hw3)
            padded = uv_padding(full_hw3.cpu().numpy(), known_hw, uv_padding_block, inpaint_radius,
                                on_tile=bar.update)
            maps[key] = torch.from_numpy(padded).to(device)
    return BakedMaps(kd=maps["kd"], ks=maps["ks"], nrm=normalize_normal_map(maps["nrm"]),
                     mask=covered_hw)
