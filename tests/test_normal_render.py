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
