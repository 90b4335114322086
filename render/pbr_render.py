"""Rendering a fixed, UV-mapped mesh with a PBR material under an environment light.

rasterize -> G-buffer (world position, smooth normal, UV tangent, UV) -> shading.shade_gbuffer
(material -> split-sum light -> sRGB, composited over the background) -> antialias, so the
image the guidance sees has smooth silhouettes on every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from render import raster
from render.light import EnvironmentLight
from render.mesh import Mesh
from render.shading import ShadeOutput, covered_pixels, shade_gbuffer
from render.util import device_constant, srgb_to_linear

# points [N, 3] -> {"kd", "ks", "nrm"} each [N, 3] (a MaterialMLP, or a per-pixel stand-in)
MaterialFn = Callable[[Tensor], dict]


class PbrRenderError(ValueError):
    pass


@dataclass
class GBuffer:
    rast: Tensor       # [B, H, W, 4] (u, v, z/w, triangle id + 1)
    pos_clip: Tensor   # [B, V, 4]
    tri: Tensor        # [F, 3] int32 position indices
    pos: Tensor        # [B, H, W, 3] world position
    normal: Tensor     # [B, H, W, 3] interpolated smooth normal (not normalized)
    tangent: Tensor    # [B, H, W, 3] interpolated UV tangent
    uv: Tensor         # [B, H, W, 2] OBJ convention (origin bottom-left)
    mask: Tensor       # [B, H, W, 1] 1 where a triangle covers the pixel centre
    covered: Tensor    # [N] int64 flat indices of the covered pixels (shading.covered_pixels)

    def tensors(self) -> list[Tensor]:
        return [self.rast, self.pos_clip, self.tri, self.pos, self.normal, self.tangent, self.uv, self.mask,
                self.covered]


def _require(mesh: Mesh) -> None:
    missing = [name for name, v in (("normals", mesh.v_nrm), ("UVs", mesh.v_tex), ("tangents", mesh.v_tng))
               if v is None]
    if missing:
        raise PbrRenderError(f"mesh lacks {', '.join(missing)}; load it through geometry.fixed_mesh."
                             "FixedMeshGeometry, which computes them")


def rasterize_gbuffer(ctx: raster.RasterContext, mesh: Mesh, mvp_bx4x4: Tensor,
                      resolution: tuple[int, int]) -> GBuffer:
    _require(mesh)
    v = mesh.v_pos
    pos_clip = raster.clip_positions(v, mvp_bx4x4)                               # [B, V, 4]
    tri = mesh.t_pos_idx.to(torch.int32).contiguous()
    rast, _ = raster.rasterize(ctx, pos_clip, tri, resolution, grad_db=False)

    def interp(attr: Tensor, idx: Tensor) -> Tensor:
        out, _ = raster.interpolate(attr[None].contiguous(), rast, idx.to(torch.int32).contiguous(), backend=ctx)
        return out

    mask = (rast[..., 3:4] > 0).float()
    return GBuffer(rast=rast, pos_clip=pos_clip, tri=tri, pos=interp(v, mesh.t_pos_idx),
                   normal=interp(mesh.v_nrm, mesh.t_nrm_idx), tangent=interp(mesh.v_tng, mesh.t_tng_idx),
                   uv=interp(mesh.v_tex, mesh.t_tex_idx), mask=mask, covered=covered_pixels(mask))


def rasterize_gbuffer_on(stream: torch.cuda.Stream | None, ctx: raster.RasterContext, mesh: Mesh,
                         mvp_bx4x4: Tensor, resolution: tuple[int, int]) -> GBuffer:
    """rasterize_gbuffer queued on `stream` (None: the current stream), without gradients.

    The rasterizer and the covered-pixel count make the host wait for their stream; on a side
    stream whose inputs (a fixed mesh, cameras copied there) do not depend on the current stream,
    that wait is short and the current stream's queue keeps the device busy meanwhile. The current
    stream then waits for the G-buffer on the device.
    """
    if stream is None:
        with torch.no_grad():
            return rasterize_gbuffer(ctx, mesh, mvp_bx4x4, resolution)
    current = torch.cuda.current_stream(stream.device)
    with torch.no_grad(), torch.cuda.stream(stream):
        gb = rasterize_gbuffer(ctx, mesh, mvp_bx4x4, resolution)
    current.wait_stream(stream)
    for t in gb.tensors():
        t.record_stream(current)     # made on `stream`, used on the current one
    return gb


def render_pbr(ctx: raster.RasterContext, mesh: Mesh, mvp_bx4x4: Tensor, campos_bx3: Tensor,
               resolution: tuple[int, int], material: MaterialFn, light: EnvironmentLight,
               mode: str = "pbr", use_bump: bool = False, background: str | Tensor = "black",
               gbuffer: GBuffer | None = None, antialias: str = "pixel") -> tuple[Tensor, ShadeOutput]:
    """-> (antialiased image [B, H, W, 3] in [0, 1], the raw ShadeOutput). `antialias`: the method
    of raster.antialias ("walk" or "pixel", the config key antialias)."""
    gb = gbuffer or rasterize_gbuffer(ctx, mesh, mvp_bx4x4, resolution)
    out = shade_gbuffer(gb.pos, gb.normal, gb.mask, campos_bx3, material, light, gb_tangent=gb.tangent,
                        use_bump=use_bump, mode=mode, background=background, backend=ctx, covered=gb.covered)
    image = raster.antialias(out.rgb.contiguous(), gb.rast, gb.pos_clip, gb.tri, backend=ctx, method=antialias)
    return image, out


class PerPixelMaterial:
    """A material whose values are already known per covered pixel (e.g. sampled from a texture).

    shade_gbuffer evaluates the material at `gbuffer.pos[mask > 0]` in row-major order; this
    returns the same pixels' precomputed values, so textured meshes shade through the same code.
    """

    def __init__(self, kd_bxhxwx3: Tensor, ks: tuple[float, float, float], mask_bxhxwx1: Tensor) -> None:
        sel = mask_bxhxwx1[..., 0] > 0
        self.kd = kd_bxhxwx3[sel]                                                   # [N, 3]
        self.ks = device_constant(tuple(ks), self.kd.dtype, self.kd.device).expand_as(self.kd)
        self.nrm = device_constant((0.0, 0.0, 1.0), self.kd.dtype, self.kd.device).expand_as(self.kd)

    def __call__(self, points_nx3: Tensor) -> dict:
        if points_nx3.shape[0] != self.kd.shape[0]:
            raise PbrRenderError(f"PerPixelMaterial: expected {self.kd.shape[0]} points (the covered pixels), "
                                 f"got {points_nx3.shape[0]}")
        return {"kd": self.kd, "ks": self.ks, "nrm": self.nrm}


def render_textured(ctx: raster.RasterContext, mesh: Mesh, mvp_bx4x4: Tensor, campos_bx3: Tensor,
                    resolution: tuple[int, int], light: EnvironmentLight, ks: tuple[float, float, float],
                    mode: str = "pbr", background: str | Tensor = "black", antialias: str = "pixel") -> Tensor:
    """Render a mesh with its own albedo texture (mesh.material['kd'], [H, W, 3] sRGB as stored in the
    image file, rows top-down), shaded like the material MLP with constant `ks` and no bump."""
    if not mesh.material or "kd" not in mesh.material:
        raise PbrRenderError("mesh has no albedo texture (material['kd']); the target of an appearance run "
                             "must be a textured OBJ/GLB")
    gb = rasterize_gbuffer(ctx, mesh, mvp_bx4x4, resolution)
    tex = srgb_to_linear(mesh.material["kd"].to(gb.pos.device, torch.float32))[None].contiguous()  # [1, Ht, Wt, 3]
    # OBJ UVs start bottom-left, image rows start at the top: flip v for the lookup.
    uv = torch.stack([gb.uv[..., 0], 1.0 - gb.uv[..., 1]], dim=-1).contiguous()
    kd = raster.texture(tex, uv, filter_mode="linear", boundary_mode="wrap", backend=ctx)
    material = PerPixelMaterial(kd, ks, gb.mask)
    image, _ = render_pbr(ctx, mesh, mvp_bx4x4, campos_bx3, resolution, material, light, mode=mode,
                          background=background, gbuffer=gb, antialias=antialias)
    return image
