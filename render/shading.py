"""Appearance shading of a rasterized G-buffer: material MLP -> split-sum light -> sRGB.

Rasterizer-agnostic: it takes the interpolated G-buffer tensors (world positions, smooth
normals, tangents, coverage) and a camera position, so any backend can feed it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from render.light import EnvironmentLight, TextureBackend
from render.material import MaterialMLP, perturb_normal
from render.util import device_constant, dot, linear_to_srgb, safe_normalize

DISPLAY_MODES = ("pbr", "diffuse", "kd", "ks", "normal")
BACKGROUNDS = {"black": (0.0, 0.0, 0.0), "white": (1.0, 1.0, 1.0)}


class ShadingError(ValueError):
    """Invalid shading arguments (shapes, modes, background)."""


@dataclass
class ShadeOutput:
    rgb: Tensor      # [B, H, W, 3] display/guidance image, sRGB (or data for ks/normal), in [0, 1], composited
    alpha: Tensor    # [B, H, W, 1] coverage used for compositing
    kd: Tensor       # [B, H, W, 3] albedo (linear), zero outside the mask
    ks: Tensor       # [B, H, W, 3] occlusion, roughness, metallic, zero outside
    normal: Tensor   # [B, H, W, 3] world-space shading normal, zero outside


def _background(background: str | Tensor, like: Tensor) -> Tensor:
    if isinstance(background, Tensor):
        return background.to(like.device, like.dtype).expand_as(like)
    if background not in BACKGROUNDS:
        raise ShadingError(f"background must be one of {tuple(BACKGROUNDS)} or a tensor, got {background!r}")
    return device_constant(BACKGROUNDS[background], like.dtype, like.device).expand_as(like)


def _check(gb_pos: Tensor, gb_normal: Tensor, gb_tangent: Tensor | None, mask: Tensor, view_pos: Tensor,
           mode: str, use_bump: bool) -> None:
    if mode not in DISPLAY_MODES:
        raise ShadingError(f"display mode must be one of {DISPLAY_MODES}, got {mode!r}")
    if gb_pos.dim() != 4 or gb_pos.shape[-1] != 3:
        raise ShadingError(f"gb_pos must be [B, H, W, 3], got {tuple(gb_pos.shape)}")
    if gb_normal.shape != gb_pos.shape:
        raise ShadingError(f"gb_normal must be {tuple(gb_pos.shape)}, got {tuple(gb_normal.shape)}")
    if mask.shape != (*gb_pos.shape[:-1], 1):
        raise ShadingError(f"mask must be {(*gb_pos.shape[:-1], 1)}, got {tuple(mask.shape)}")
    if view_pos.shape not in ((gb_pos.shape[0], 3), (gb_pos.shape[0], 1, 1, 3)):
        raise ShadingError(f"view_pos must be [B, 3] or [B, 1, 1, 3] with B={gb_pos.shape[0]}, got {tuple(view_pos.shape)}")
    if use_bump and (gb_tangent is None or gb_tangent.shape != gb_pos.shape):
        got = None if gb_tangent is None else tuple(gb_tangent.shape)
        raise ShadingError(f"use_bump needs gb_tangent of shape {tuple(gb_pos.shape)} (mesh UV tangents), got {got}")


def covered_pixels(mask_bxhxwx1: Tensor) -> Tensor:
    """[N] int64 flat (row-major) indices of the pixels with mask > 0: the order of boolean-mask
    indexing. One nonzero, i.e. one host sync."""
    return (mask_bxhxwx1[..., 0] > 0).reshape(-1).nonzero().squeeze(1)


def shade_gbuffer(gb_pos: Tensor, gb_normal: Tensor, mask: Tensor, view_pos: Tensor, material: MaterialMLP,
                  light: EnvironmentLight, gb_tangent: Tensor | None = None, use_bump: bool = False,
                  mode: str = "pbr", background: str | Tensor = "black",
                  backend: TextureBackend = "auto", covered: Tensor | None = None) -> ShadeOutput:
    """Shade covered pixels (mask > 0) and composite over the background.

    gb_pos, gb_normal (smooth, world space), gb_tangent: [B, H, W, 3]; mask [B, H, W, 1] in
    [0, 1] (e.g. antialiased coverage); view_pos [B, 3] camera positions. Modes: "pbr"
    (diffuse + specular), "diffuse", "kd" (albedo, sRGB), "ks" (raw channels), "normal"
    ((n + 1) / 2). Only covered pixels are evaluated by the material network. ``backend``: the
    light's texture lookups (pass the render's RasterContext). ``covered``: covered_pixels(mask),
    if already known."""
    _check(gb_pos, gb_normal, gb_tangent, mask, view_pos, mode, use_bump)
    bsz = gb_pos.shape[0]
    # The covered pixels as one flat index: a single nonzero (host sync) for the whole call, or
    # none when given; every gather/scatter below reuses it.
    idx = covered_pixels(mask) if covered is None else covered               # [N]

    def take(x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, idx)

    pos = take(gb_pos)                                       # [N, 3]
    mat = material(pos)
    cam = view_pos.reshape(bsz, 3).index_select(0, idx // (gb_pos.shape[1] * gb_pos.shape[2]))  # [N, 3]

    # Two-sided shading: a normal facing away from the camera is flipped so that back faces
    # seen through holes are lit like front faces instead of turning black.
    wo = safe_normalize(cam - pos)
    n = safe_normalize(take(gb_normal))
    n = torch.where(dot(n, wo) < 0, -n, n)
    if use_bump:
        assert gb_tangent is not None
        n = perturb_normal(mat["nrm"], n, take(gb_tangent))

    if mode in ("pbr", "diffuse"):
        color = linear_to_srgb(light.shade(pos, n, mat["kd"], mat["ks"], cam, specular=(mode == "pbr"),
                                             backend=backend))
    elif mode == "kd":
        color = linear_to_srgb(mat["kd"])
    elif mode == "ks":
        color = mat["ks"]
    else:
        color = (n + 1.0) * 0.5

    def scatter(values: Tensor) -> Tensor:
        out = gb_pos.new_zeros(gb_pos.shape[:-1].numel(), values.shape[-1])
        return out.index_put((idx,), values.to(out.dtype)).reshape(*gb_pos.shape[:-1], values.shape[-1])

    alpha = mask.clamp(0.0, 1.0)
    image = scatter(color.clamp(0.0, 1.0))
    rgb = image * alpha + _background(background, image) * (1.0 - alpha)
    return ShadeOutput(rgb=rgb, alpha=alpha, kd=scatter(mat["kd"]), ks=scatter(mat["ks"]), normal=scatter(n))
