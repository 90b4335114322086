"""render/normal_render.py: normals + mask image, two-sidedness, rotation, flip, gradients."""

from __future__ import annotations

import pytest
import torch
import trimesh

from dataset.cameras import CameraOptions, validation_cameras
from render import raster
from render.normal_render import NormalRenderError, normal_to_display, render_normal_mask

CTX = raster.make_context("cpu")
RES = (48, 48)


def _sphere(sub: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    s = trimesh.creation.icosphere(subdivisions=sub, radius=0.8)
    return torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int64)


def _cams(n: int = 4):
    return validation_cameras(CameraOptions(resolution=RES, fovy_range=(45.0, 45.0)), "cpu", n=n)


def test_output_layout_and_values() -> None:
    verts, faces = _sphere()
    cams = _cams()
    img = render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos, RES)
    assert img.shape == (4, *RES, 4)
    mask = img[..., 3]
    assert float(mask[:, 0, 0].abs().max()) == 0.0 and float(img[:, 0, 0].abs().max()) == 0.0   # black bg
    inside = mask == 1.0
    n = img[..., :3][inside]
    assert torch.allclose(n.norm(dim=-1), torch.ones(n.shape[0]), atol=1e-3)
    # Front view centre: normal points at the camera (+z); row 0 is the top (upright image).
    h, w = RES
    assert float(img[0, h // 2, w // 2, 2]) > 0.95
    assert float(img[0, 8, w // 2, 1]) > 0.5 and float(img[0, h - 9, w // 2, 1]) < -0.5
    # Side view (azimuth 90, camera at -x): centre normal is -x.
    assert float(img[1, h // 2, w // 2, 0]) < -0.95
    disp = normal_to_display(img)
    assert disp.shape == (4, *RES, 3) and float(disp.min()) >= 0.0 and float(disp.max()) <= 1.0
    assert float(disp[:, 0, 0].abs().max()) == 0.0


def test_two_sided_normals_face_the_camera() -> None:
    verts, faces = _sphere()
    cams = _cams(1)
    flipped = faces[:, [0, 2, 1]]                                    # inward-facing winding
    a = render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos, RES)
    b = render_normal_mask(CTX, verts, flipped, cams.mvp, cams.campos, RES)
    assert torch.allclose(a, b, atol=1e-5)


def test_normal_rotation_and_flip() -> None:
    verts, faces = _sphere()
    cams = _cams(1)
    angle = torch.tensor(0.7)
    c, s = torch.cos(angle), torch.sin(angle)
    rot = torch.tensor([[[c, 0, s], [0, 1, 0], [-s, 0, c]]])
    base = render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos, RES)
    rotated = render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos, RES, normal_rotate_bx3x3=rot)
    assert torch.allclose(rotated[..., :3], base[..., :3] @ rot[:, None], atol=1e-5)
    assert torch.allclose(rotated[..., 3], base[..., 3])
    flipped = render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos, RES, flip_normal=True)
    assert float(flipped[..., 0].max()) <= 0.0
    assert torch.allclose(flipped[..., 0], -base[..., 0].abs(), atol=1e-6)
    assert torch.allclose(flipped[..., 1:], base[..., 1:])


def test_gradient_finite_and_nonzero_at_silhouette() -> None:
    verts, faces = _sphere(1)
    cams = _cams(2)
    v = verts.clone().requires_grad_(True)
    img = render_normal_mask(CTX, v, faces, cams.mvp, cams.campos, RES)
    img[..., 3].sum().backward()                                     # mask only: pure silhouette signal
    g = v.grad
    assert g is not None and bool(torch.isfinite(g).all())
    assert float(g.norm(dim=-1).max()) > 0
    # Growing the sphere grows the mask: the radial gradient component is positive.
    radial = (g * v.detach()).sum()
    assert float(radial) > 0
    # The normal channels also get gradients (through normals and barycentrics).
    v.grad = None
    img = render_normal_mask(CTX, v, faces, cams.mvp, cams.campos, RES)
    (img[..., :3] * torch.randn(img[..., :3].shape, generator=torch.Generator().manual_seed(0))).sum().backward()
    assert bool(torch.isfinite(v.grad).all()) and float(v.grad.abs().sum()) > 0


def test_bad_inputs() -> None:
    verts, faces = _sphere()
    cams = _cams(2)
    with pytest.raises(NormalRenderError, match="no faces"):
        render_normal_mask(CTX, verts, faces[:0], cams.mvp, cams.campos, RES)
    with pytest.raises(NormalRenderError, match="campos_bx3"):
        render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos[:1], RES)
    with pytest.raises(NormalRenderError, match="normal_rotate_bx3x3"):
        render_normal_mask(CTX, verts, faces, cams.mvp, cams.campos, RES, normal_rotate_bx3x3=torch.eye(3))


# ------------------------------------------------------------------------------------------------
# The optimized renderer (face normals computed once, per-face two-sided test folded into the mask)
# against the previous per-pixel implementation, kept here as the reference.
# ------------------------------------------------------------------------------------------------
def _reference_render_normal_mask(ctx, verts_vx3, faces_fx3, mvp_bx4x4, campos_bx3, resolution,
                                  normal_rotate_bx3x3=None, flip_normal=False):
    from render.mesh import Mesh, compute_vertex_normals
    tri = faces_fx3.to(torch.int32)
    mesh = compute_vertex_normals(Mesh(v_pos=verts_vx3, t_pos_idx=faces_fx3.long()))
    homog = torch.cat([verts_vx3, torch.ones_like(verts_vx3[:, :1])], dim=1)
    pos_clip = torch.einsum("bij,vj->bvi", mvp_bx4x4, homog).contiguous()
    rast, _ = raster.rasterize(ctx, pos_clip, tri, resolution, grad_db=False)
    mask = (rast[..., 3:4] > 0).float()
    gb_pos, _ = raster.interpolate(verts_vx3[None].contiguous(), rast, tri, backend=ctx)
    gb_nrm, _ = raster.interpolate(mesh.v_nrm[None].contiguous(), rast, tri, backend=ctx)
    gb_nrm = gb_nrm / torch.sqrt(torch.clamp((gb_nrm * gb_nrm).sum(-1, keepdim=True), min=1e-20))
    tid = rast[..., 3].detach().long() - 1
    with torch.no_grad():
        v = verts_vx3.detach()
        f = faces_fx3.long()
        face_n = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=-1)
        geo_n = face_n[tid.clamp(min=0)]
        view = campos_bx3[:, None, None, :] - gb_pos.detach()
        facing = ((geo_n * view).sum(-1, keepdim=True) >= 0).float()
    gb_nrm = gb_nrm * (2.0 * facing - 1.0)
    if normal_rotate_bx3x3 is not None:
        gb_nrm = torch.einsum("bhwi,bij->bhwj", gb_nrm, normal_rotate_bx3x3)
    if flip_normal:
        gb_nrm = torch.cat([-gb_nrm[..., :1].abs(), gb_nrm[..., 1:]], dim=-1)
    image = torch.cat([gb_nrm * mask, mask], dim=-1)
    return raster.antialias(image.contiguous(), rast, pos_clip, tri, backend=ctx)


def _bumpy_open_mesh() -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy sphere with a cap removed: back faces visible through the hole."""
    verts, faces = _sphere(3)
    gen = torch.Generator().manual_seed(1)
    verts = verts * (1 + 0.05 * torch.rand(verts.shape[0], 1, generator=gen))
    keep = verts[faces].mean(1)[:, 2] < 0.5
    return verts, faces[keep]


@pytest.mark.parametrize("rotate,flip", [(False, False), (True, False), (False, True), (True, True)])
def test_matches_reference_implementation(rotate: bool, flip: bool) -> None:
    verts, faces = _bumpy_open_mesh()
    cams = _cams(4)
    rot = None
    if rotate:
        gen = torch.Generator().manual_seed(2)
        rot = torch.linalg.qr(torch.randn(4, 3, 3, generator=gen)).Q.contiguous()
    w = torch.randn(4, *RES, 4, generator=torch.Generator().manual_seed(3))
    outs, grads = [], []
    for fn in (_reference_render_normal_mask, render_normal_mask):
        v = verts.clone().requires_grad_(True)
        img = fn(CTX, v, faces, cams.mvp, cams.campos, RES, rot, flip)
        (img * w).sum().backward()
        outs.append(img.detach())
        grads.append(v.grad)
    if rotate:
        # The renderer rotates the vertex normals before interpolating (the reference rotates the
        # pixel normals after): equal in exact arithmetic, a few float32 ulp apart here.
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=1e-6)
    else:
        assert torch.equal(outs[0], outs[1])
    # The CPU raster backend's backward accumulates in a thread-dependent order (the reference
    # against itself differs by a few ulp), so gradients are compared to rounding.
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-5)
    assert float((outs[1][..., 2] < 0).float().sum()) > 0 or rotate or flip   # back faces were seen
