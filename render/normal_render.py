"""Geometry-phase rendering: world-space shading normals + mask, antialiased, black background."""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import torch
from torch import Tensor

from render import raster
from render.mesh import face_and_vertex_normals


class NormalRenderError(ValueError):
    """Bad argument to render_normal_mask."""


def _check_inputs(verts: Tensor, faces: Tensor, mvp: Tensor, campos: Tensor,
                  normal_rotate: Tensor | None) -> int:
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise NormalRenderError(f"verts_vx3: expected [V, 3], got {tuple(verts.shape)}")
    if faces.ndim != 2 or faces.shape[1] != 3 or faces.dtype.is_floating_point:
        raise NormalRenderError(f"faces_fx3: expected integer [F, 3], got {tuple(faces.shape)} {faces.dtype}")
    if faces.shape[0] == 0:
        raise NormalRenderError("faces_fx3: the mesh has no faces (empty surface, e.g. SDF without a "
                                "zero crossing); nothing can be rendered")
    if mvp.ndim != 3 or mvp.shape[1:] != (4, 4):
        raise NormalRenderError(f"mvp_bx4x4: expected [B, 4, 4], got {tuple(mvp.shape)}")
    b = mvp.shape[0]
    if campos.shape != (b, 3):
        raise NormalRenderError(f"campos_bx3: expected [{b}, 3], got {tuple(campos.shape)}")
    if normal_rotate is not None and normal_rotate.shape != (b, 3, 3):
        raise NormalRenderError(f"normal_rotate_bx3x3: expected [{b}, 3, 3], got {tuple(normal_rotate.shape)}")
    return b


def render_normal_mask(ctx: raster.RasterContext, verts_vx3: Tensor, faces_fx3: Tensor, mvp_bx4x4: Tensor,
                       campos_bx3: Tensor, resolution: Sequence[int], normal_rotate_bx3x3: Tensor | None = None,
                       flip_normal: bool = False, antialias: str = "pixel") -> Tensor:
    """Render [B, H, W, 4]: world-space shading normal xyz in [-1, 1] and the mask, black background.

    - Normals: area-weighted vertex normals of `verts_vx3`, interpolated and normalized, made
      two-sided (negated where the geometric face normal points away from the camera).
    - `normal_rotate_bx3x3`: per-sample rotation applied as n @ R (row vectors, as the reference code).
    - `flip_normal`: the `if_flip_the_normal` trick, negating positive x components.
    - Composited over black and antialiased, so silhouettes carry gradients to `verts_vx3`;
      `antialias`: the method of raster.antialias ("walk" or "pixel", the config key antialias).

    The same as normal_render_inputs, rasterize, shade_normal_mask (the split a caller uses to
    replay the part after the rasterizer from a CUDA graph).
    """
    inputs = normal_render_inputs(verts_vx3, faces_fx3, mvp_bx4x4, campos_bx3, normal_rotate_bx3x3)
    # Built before the rasterizer too: its kernels queue while the device is busy.
    topology = raster.antialias_topology(inputs.tri, verts_vx3.shape[0], backend=ctx, method=antialias)
    rast, _ = raster.rasterize(ctx, inputs.pos_clip, inputs.tri, resolution, grad_db=False)
    return shade_normal_mask(ctx, inputs.attr, rast, inputs.pos_clip, inputs.tri, inputs.sign_table,
                             flip_normal, topology, antialias)


class NormalRenderInputs(NamedTuple):
    """What the ops after the rasterizer need, made before it: their kernels are queued while the
    device is busy, before the rasterizer makes the host wait for the device."""
    attr: Tensor          # [1 or B, V, 3] unit vertex normals (rotated per camera when asked)
    pos_clip: Tensor      # [B, V, 4] clip-space positions
    tri: Tensor           # [F, 3] int32 faces
    sign_table: Tensor    # [B, F + 1] per (camera, face id + 1): +-1 two-sided sign, 0 background


def normal_render_inputs(verts_vx3: Tensor, faces_fx3: Tensor, mvp_bx4x4: Tensor, campos_bx3: Tensor,
                         normal_rotate_bx3x3: Tensor | None = None) -> NormalRenderInputs:
    """The first part of render_normal_mask (its arguments and checks)."""
    b = _check_inputs(verts_vx3, faces_fx3, mvp_bx4x4, campos_bx3, normal_rotate_bx3x3)
    f = faces_fx3.long()
    face_n, v_nrm = face_and_vertex_normals(verts_vx3, f)
    if normal_rotate_bx3x3 is not None:
        # Rotating the vertex normals equals rotating the interpolated, normalized pixel normals:
        # interpolation is linear and a rotation keeps lengths.
        attr = torch.einsum("vi,bij->bvj", v_nrm, normal_rotate_bx3x3).contiguous()   # [B, V, 3]
    else:
        attr = v_nrm[None].contiguous()                                             # [1, V, 3]
    pos_clip = raster.clip_positions(verts_vx3, mvp_bx4x4)                         # [B, V, 4]
    # Two-sided: the sign comes from the geometric normal, which is what "facing away" means.
    # A triangle is planar, so (campos - p) . n_f has one sign for every point p of the face:
    # it is evaluated per (camera, face) and looked up per pixel together with the mask
    # (entry 0 = background), instead of interpolating positions and gathering normals per pixel.
    with torch.no_grad():
        n_f = face_n.detach()
        v0 = verts_vx3.detach()[f[:, 0]]
        view_dot = torch.mm(campos_bx3, n_f.t()) - (v0 * n_f).sum(-1)               # [B, F]
        sign_bf = torch.where(view_dot >= 0, 1.0, -1.0).to(verts_vx3.dtype)
        table = torch.cat([sign_bf.new_zeros(b, 1), sign_bf], dim=1)               # [B, F + 1]
    return NormalRenderInputs(attr, pos_clip, faces_fx3.to(torch.int32), table)


def shade_normal_mask(ctx: raster.RasterContext | str, attr: Tensor, rast: Tensor, pos_clip: Tensor, tri: Tensor,
                      sign_table: Tensor, flip_normal: bool = False, topology: Any = None,
                      antialias: str = "pixel") -> Tensor:
    """The part of render_normal_mask after the rasterizer: [B, H, W, 4] from `rast` [B, H, W, 4]
    and NormalRenderInputs. `topology`: raster.antialias_topology(tri, V, method=antialias), built
    here when None (the walk's in fixed-size ops, so also inside a CUDA graph capture)."""
    if topology is None:
        topology = raster.antialias_topology(tri, pos_clip.shape[-2], backend=ctx, method=antialias)
    gb_nrm, _ = raster.interpolate(attr, rast, tri, backend=ctx)                    # [B, H, W, 3]
    # One autograd node with fewer kernels (9 instead of 11, 10 instead of 14 flipped): without a
    # CUDA graph the host launches them while the device idles after the rasterizer's synchronization.
    image = _ShadeNormals.apply(gb_nrm, rast, sign_table, flip_normal)              # [B, H, W, 4]
    return raster.antialias(image, rast, pos_clip, tri, backend=ctx, topology=topology, method=antialias)


_MIN_SQ_LEN = 1e-20   # clamp of the squared normal length before the square root


class _ShadeNormals(torch.autograd.Function):
    """Interpolated normals [B, H, W, 3] -> [B, H, W, 4] (unit two-sided normal, mask), black background.

    Forward: n = g / sqrt(max(|g|^2, 1e-20)), times the per-pixel sign table[b, tid] (+-1 covered,
    0 outside), x -> -|x| if flipped, then the coverage mask; bit-identical to those ops written
    with autograd (tests/test_normal_render.py::_reference_shade), run without graph recording (as
    every Function's forward). Backward: the analytic gradient with respect to g only, equal to
    autograd's through the same ops (including the clamp and abs kinks).
    """

    @staticmethod
    def forward(ctx, gb_nrm: Tensor, rast: Tensor, table: Tensor, flip: bool) -> Tensor:
        sq = (gb_nrm * gb_nrm).sum(-1, keepdim=True)                                # [B, H, W, 1]
        length = torch.clamp(sq, min=_MIN_SQ_LEN).sqrt_()                           # [B, H, W, 1]
        unit = gb_nrm / length                                                      # [B, H, W, 3]
        tid_channel = rast[..., 3:4]                                                # face id + 1, 0 = none
        scale = torch.gather(table, 1, tid_channel.long().view(table.shape[0], -1))
        scale = scale.view(tid_channel.shape)                                       # [B, H, W, 1]
        # The dtype torch.cat([unit * scale, mask.float()]) would have.
        dtype = torch.promote_types(torch.promote_types(unit.dtype, scale.dtype), torch.float32)
        out = unit.new_empty((*unit.shape[:-1], 4), dtype=dtype)                    # [B, H, W, 4]
        # Multiplying by +-1 / 0 is exact and commutes with the flip (which comes after the sign).
        torch.mul(unit, scale, out=out[..., :3])
        if flip:
            out[..., :1].copysign_(-1.0)        # x > 0 -> -x: bit-identical to -|x|, one kernel not two
        torch.gt(tid_channel, 0, out=out[..., 3:])                                  # mask: 1.0 / 0.0
        ctx.save_for_backward(unit, sq, length, scale)
        ctx.flip = flip
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, None, None, None]:
        unit, sq, length, scale = ctx.saved_tensors
        grad_unit = grad_out[..., :3] * scale                                       # [B, H, W, 3]
        if ctx.flip:
            # d(-|z|)/dz = -sign(z), 0 at z == 0 (torch's abs), with z = unit_x * scale.
            grad_unit[..., :1].mul_(torch.sign(unit[..., :1] * scale).neg_())
        # d(g / L)/dg = (I - u u^T) / L with L = sqrt(|g|^2); where the clamp is active, L is the
        # constant sqrt(1e-20) and only I / L remains (torch passes the clamp's gradient where
        # |g|^2 >= min).
        radial = (grad_unit * unit).sum(-1, keepdim=True)                           # [B, H, W, 1]
        radial = torch.where(sq >= _MIN_SQ_LEN, radial, 0.0)
        return torch.addcmul(grad_unit, unit, radial, value=-1.0).div_(length), None, None, None


def normal_to_display(normal_mask_bxhxwx4: Tensor) -> Tensor:
    """[B, H, W, 4] from render_normal_mask -> [B, H, W, 3] in [0, 1], black background.

    The antialiased image is coverage-weighted (n * a, a), so (n * a + a) / 2 = a * (n + 1) / 2.
    """
    n, a = normal_mask_bxhxwx4[..., :3], normal_mask_bxhxwx4[..., 3:4]
    return ((n + a) * 0.5).clamp(0.0, 1.0)
