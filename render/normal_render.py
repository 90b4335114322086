"""Geometry-phase rendering: world-space shading normals + mask, antialiased, black background."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from render import raster
from render.mesh import _safe_normalize
from render.util import device_constant, gather_rows


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
                       flip_normal: bool = False) -> Tensor:
    """Render [B, H, W, 4]: world-space shading normal xyz in [-1, 1] and the mask, black background.

    - Normals: area-weighted vertex normals of `verts_vx3`, interpolated and normalized, made
      two-sided (negated where the geometric face normal points away from the camera).
    - `normal_rotate_bx3x3`: per-sample rotation applied as n @ R (row vectors, as the reference code).
    - `flip_normal`: the `if_flip_the_normal` trick, negating positive x components.
    - Composited over black and antialiased, so silhouettes carry gradients to `verts_vx3`.
    """
    b = _check_inputs(verts_vx3, faces_fx3, mvp_bx4x4, campos_bx3, normal_rotate_bx3x3)
    f = faces_fx3.long()
    tri = faces_fx3.to(torch.int32)
    # Everything that does not need the rasterizer's output comes first: its kernels are queued
    # while the device is busy, before the rasterizer makes the host wait for the device.
    face_n, v_nrm = _face_and_vertex_normals(verts_vx3, f)
    if normal_rotate_bx3x3 is not None:
        # Rotating the vertex normals equals rotating the interpolated, normalized pixel normals:
        # interpolation is linear and a rotation keeps lengths.
        attr = torch.einsum("vi,bij->bvj", v_nrm, normal_rotate_bx3x3).contiguous()   # [B, V, 3]
    else:
        attr = v_nrm[None].contiguous()                                             # [1, V, 3]
    pos_clip = raster.clip_positions(verts_vx3, mvp_bx4x4)                         # [B, V, 4]
    topology = raster.antialias_topology(tri, verts_vx3.shape[0], backend=ctx)
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

    rast, _ = raster.rasterize(ctx, pos_clip, tri, resolution, grad_db=False)
    gb_nrm, _ = raster.interpolate(attr, rast, tri, backend=ctx)
    gb_nrm = gb_nrm / torch.sqrt(torch.clamp((gb_nrm * gb_nrm).sum(-1, keepdim=True), min=1e-20))
    with torch.no_grad():
        tid = rast[..., 3].long().reshape(b, -1)                                    # face id + 1, 0 = none
        scale = torch.gather(table, 1, tid).reshape(*rast.shape[:3], 1)             # +-1 covered, 0 outside
    # Multiplying by +-1 / 0 is exact and commutes with the flip (which comes after the sign).
    gb_nrm = gb_nrm * scale
    if flip_normal:
        gb_nrm = torch.cat([-gb_nrm[..., :1].abs(), gb_nrm[..., 1:]], dim=-1)    # x > 0 -> -x
    mask = (rast[..., 3:4] > 0).float()                                             # [B, H, W, 1]
    image = torch.cat([gb_nrm, mask], dim=-1)                                       # black background
    return raster.antialias(image.contiguous(), rast, pos_clip, tri, backend=ctx, topology=topology)


def _face_and_vertex_normals(v: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """(face normals [F, 3] of length 2 * area, area-weighted unit vertex normals [V, 3]).

    The same operations as render.mesh.compute_vertex_normals (bit-identical vertex normals),
    returning the face normals as well so the caller does not compute them a second time.
    """
    v0, v1, v2 = (gather_rows(v, f[:, k]) for k in range(3))                        # [F, 3] each
    face_n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    acc = torch.zeros_like(v)
    for k in range(3):
        acc = acc.index_add(0, f[:, k], face_n)
    length2 = (acc * acc).sum(-1, keepdim=True)
    acc = torch.where(length2 > 1e-20, acc, device_constant((0.0, 0.0, 1.0), v.dtype, v.device).expand_as(acc))
    return face_n, _safe_normalize(acc)


def normal_to_display(normal_mask_bxhxwx4: Tensor) -> Tensor:
    """[B, H, W, 4] from render_normal_mask -> [B, H, W, 3] in [0, 1], black background.

    The antialiased image is coverage-weighted (n * a, a), so (n * a + a) / 2 = a * (n + 1) / 2.
    """
    n, a = normal_mask_bxhxwx4[..., :3], normal_mask_bxhxwx4[..., 3:4]
    return ((n + a) * 0.5).clamp(0.0, 1.0)
