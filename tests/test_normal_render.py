"""render/normal_render.py: normals + mask image, two-sidedness, rotation, flip, gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import trimesh

from dataset.cameras import CameraOptions, validation_cameras
from render import raster
from render.mesh import Mesh, compute_vertex_normals
from render.normal_render import NormalRenderError, _ShadeNormals, normal_to_display, render_normal_mask
from render.util import resize_bilinear_aa

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



# ------------------------------------------------------------------------------------------------
# _ShadeNormals (one autograd node for normalize, sign, flip and mask) against the autograd ops it
# replaces, kept verbatim here as the reference.
# ------------------------------------------------------------------------------------------------
def _reference_shade(gb_nrm, rast, table, flip_normal):
    b = rast.shape[0]
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
    return image.contiguous()


def _shade_inputs(b: int, h: int, w: int, f: int, dtype: torch.dtype, seed: int,
                  kinks: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gb_nrm [B, H, W, 3], rast [B, H, W, 4] float32, table [B, F + 1]) like the renderer's.

    kinks: also exactly zero x components, zero normals and normals shorter than sqrt(1e-20)
    (clamp active); without, |x| >= 0.1 and lengths in [0.5, 3] (smooth for gradcheck).
    """
    gen = torch.Generator().manual_seed(seed)
    tid = torch.randint(0, f + 1, (b, h, w), generator=gen)
    tid[:, 0, :] = 0                                                                # uncovered row
    rast = torch.rand(b, h, w, 4, generator=gen)
    rast[..., 3] = tid.float()
    table = torch.where(torch.rand(b, f + 1, generator=gen) < 0.5, 1.0, -1.0).to(dtype)
    table[:, 0] = 0.0                                                               # background
    n = torch.randn(b, h, w, 3, generator=gen, dtype=torch.float64)
    if kinks:
        n = n * torch.exp(torch.empty(b, h, w, 1, dtype=torch.float64).uniform_(-3, 3, generator=gen))
        n[:, 1, :4, 0] = 0.0                                                        # x == 0
        n[:, 2, :4] = 0.0                                                           # zero normal
        n[:, 3, :4] *= 1e-12                                                        # |n|^2 < 1e-20
    else:
        n[..., 0] = torch.where(n[..., 0] < 0, -0.1, 0.1) + n[..., 0]
        n = n / n.norm(dim=-1, keepdim=True) * torch.empty(b, h, w, 1, dtype=torch.float64).uniform_(
            0.5, 3, generator=gen)
    return n.to(dtype), rast, table


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_shade_normals_matches_reference_ops(device: str, dtype: torch.dtype, flip: bool) -> None:
    gb_nrm, rast, table = (t.to(device) for t in _shade_inputs(2, 16, 16, 9, dtype, seed=5))
    scale = table.gather(1, rast[..., 3].long().reshape(2, -1)).reshape(2, 16, 16)
    # The cases are there: uncovered, both signs, x == 0 and zero normals (clamp active) where covered.
    assert all(int((scale == s).sum()) > 0 for s in (0.0, 1.0, -1.0))
    assert int(((gb_nrm[..., 0] == 0) & (scale != 0)).sum()) > 0
    assert int((((gb_nrm * gb_nrm).sum(-1) < 1e-20) & (gb_nrm[..., 0] != 0) & (scale != 0)).sum()) > 0
    assert int(((gb_nrm == 0).all(-1) & (scale != 0)).sum()) > 0
    grad_out = torch.randn(2, 16, 16, 4, generator=torch.Generator().manual_seed(6), dtype=dtype).to(device)
    outs, grads = [], []
    for fn in (_reference_shade, _ShadeNormals.apply):
        x = gb_nrm.clone().requires_grad_(True)
        img = fn(x, rast, table, flip)
        (g,) = torch.autograd.grad(img, x, grad_out)
        outs.append(img)
        grads.append(g)
    assert outs[1].dtype == outs[0].dtype and outs[1].is_contiguous()
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    assert torch.equal(outs[1].view(bits), outs[0].view(bits))                      # -0.0 included
    # Same derivative with the terms in another order: measured <= 1 ulp of the largest gradients
    # (|grad_out| / |n| ~ 50 here: 7e-15 in float64, 4e-6 in float32); relative where the clamp is
    # active (1 / sqrt(1e-20) = 1e10), absolute where I - u u^T cancels.
    tol = 1e-13 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(grads[1], grads[0], rtol=tol, atol=tol)
    assert float(grads[1].abs().max()) > 1e9                                        # clamp case reached


@pytest.mark.parametrize("flip", [False, True])
def test_shade_normals_gradcheck(flip: bool) -> None:
    gb_nrm, rast, table = _shade_inputs(2, 3, 4, 5, torch.float64, seed=7, kinks=False)
    x = gb_nrm.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda n: _ShadeNormals.apply(n, rast, table, flip), (x,))


# The coarse stage's 512^2 -> 64^2 latent resize (render.util.resize_bilinear_aa) must be PyTorch's
# antialiased bilinear resize: downscales by 8 (the coarse latent), odd ratios and non-square sizes
# (the border taps are renormalized), and an upscale.
RESIZE_CASES = [((2, 128, 128, 4), (16, 16)), ((1, 37, 53, 3), (8, 11)), ((1, 16, 12, 2), (32, 20))]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
@pytest.mark.parametrize("shape, size", RESIZE_CASES)
def test_latent_resize_equals_antialiased_interpolate(device: str, shape: tuple, size: tuple) -> None:
    gen = torch.Generator().manual_seed(4)
    # float64 on the CPU: the two differ only by summation order (~1e-16); float32 on CUDA, where
    # both run in single precision over <= 16 taps per axis (~1e-6 of values of order 1).
    dtype, tol = (torch.float64, 1e-12) if device == "cpu" else (torch.float32, 2e-5)
    img = torch.randn(*shape, generator=gen, dtype=dtype).to(device)
    grad_out = torch.randn(shape[0], shape[3], *size, generator=gen, dtype=dtype).to(device)
    outs, grads = [], []
    for fn in (lambda x: F.interpolate(x.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False,
                                       antialias=True), lambda x: resize_bilinear_aa(x, size)):
        x = img.clone().requires_grad_(True)
        y = fn(x)
        (g,) = torch.autograd.grad(y, x, grad_out)
        outs.append(y)
        grads.append(g)
    assert outs[1].shape == outs[0].shape
    torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=tol)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=tol)


def test_latent_resize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        resize_bilinear_aa(torch.zeros(8, 8, 4), (4, 4))
    with pytest.raises(ValueError, match="size"):
        resize_bilinear_aa(torch.zeros(1, 8, 8, 4), (0, 4))
