"""render/raster.py with the torch backend (CPU) + a GPU parity test against nvdiffrast."""

from __future__ import annotations

import math

import pytest
import torch
import trimesh

from render import raster
from render.raster import RasterBackendError, RasterInputError

CTX = raster.make_context("cpu")


def _perspective(fovy_deg: float, near: float = 1.0, far: float = 50.0) -> torch.Tensor:
    y = math.tan(math.radians(fovy_deg) / 2)
    return torch.tensor([[1 / y, 0, 0, 0], [0, 1 / y, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
                         [0, 0, -1, 0]], dtype=torch.float32)


def _mvp(distance: float = 3.0, fovy_deg: float = 45.0) -> torch.Tensor:
    mv = torch.eye(4)
    mv[2, 3] = -distance
    return _perspective(fovy_deg) @ mv


def _clip(verts: torch.Tensor, mvp: torch.Tensor) -> torch.Tensor:
    """[V, 3] -> [1, V, 4]."""
    return (torch.cat([verts, torch.ones_like(verts[:, :1])], 1) @ mvp.T)[None].contiguous()


def _sphere(subdivisions: int) -> tuple[torch.Tensor, torch.Tensor]:
    s = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int32)


def test_sphere_silhouette_area() -> None:
    verts, tri = _sphere(5)
    fovy = 45.0
    rast, _ = raster.rasterize(CTX, _clip(verts, _mvp(3.0, fovy)), tri, (256, 256))
    covered = float((rast[..., 3] > 0).float().mean())
    # Unit sphere at distance 3: silhouette cone half-angle asin(1/3) -> NDC disc radius r.
    r = math.tan(math.asin(1.0 / 3.0)) / math.tan(math.radians(fovy) / 2)
    analytic = math.pi * r * r / 4.0          # NDC square has area 4
    assert covered == pytest.approx(analytic, rel=0.01)


def test_pixel_centres_and_row_order() -> None:
    # Triangle covering only x > 0 and y < 0 in NDC (lower-left is row 0): check exact pixel sets.
    pos = torch.tensor([[[0.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast, _ = raster.rasterize(CTX, pos, tri, (4, 4))
    cov = rast[0, ..., 3] > 0
    # Pixel centres at NDC -0.75, -0.25, 0.25, 0.75: covered where x > 0, y < 0 and y + 1 <= x.
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for row, yc in enumerate([-0.75, -0.25, 0.25, 0.75]):
        for col, xc in enumerate([-0.75, -0.25, 0.25, 0.75]):
            expected[row, col] = xc > 0 and yc < 0 and yc + 1 <= xc
    assert torch.equal(cov, expected)
    assert float(rast[0, 0, 3, 3]) == 1.0      # triangle id + 1


def test_perspective_correct_barycentrics_exact_for_linear_attributes() -> None:
    # A slanted quad in perspective: interpolated world positions must reproject onto the pixel
    # centres, and a linear function of position must interpolate to its value there.
    verts = torch.tensor([[-1.0, -1.0, 0.8], [1.0, -1.0, -0.8], [1.0, 1.0, -0.8], [-1.0, 1.0, 0.8]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    mvp = _mvp(3.0, 60.0)
    h = w = 48
    rast, _ = raster.rasterize(CTX, _clip(verts, mvp), tri, (h, w))
    linear = verts @ torch.tensor([2.0, -3.0, 1.5]) + 0.25            # [V]
    attr = torch.cat([verts, linear[:, None]], dim=1)[None]           # [1, V, 4]
    out, _ = raster.interpolate(attr, rast, tri)
    cov = rast[0, ..., 3] > 0
    assert int(cov.sum()) > 500
    world = out[0][cov][:, :3]
    clip = torch.cat([world, torch.ones_like(world[:, :1])], 1) @ mvp.T
    ndc = clip[:, :2] / clip[:, 3:]
    ys, xs = torch.nonzero(cov, as_tuple=True)
    centre = torch.stack([(xs + 0.5) / w * 2 - 1, (ys + 0.5) / h * 2 - 1], dim=1)
    assert torch.allclose(ndc, centre, atol=2e-5)
    assert torch.allclose(clip[:, 2] / clip[:, 3], rast[0, ..., 2][cov], atol=2e-5)
    expected = world @ torch.tensor([2.0, -3.0, 1.5]) + 0.25
    assert torch.allclose(out[0][cov][:, 3], expected, atol=1e-5)
    assert float(out[0][~cov].abs().max()) == 0.0                     # empty pixels are zero


@pytest.mark.parametrize("near_first", [True, False])
def test_nearer_triangle_wins(near_first: bool) -> None:
    near = [[-0.8, -0.8, -0.5, 1.0], [0.6, -0.8, -0.5, 1.0], [-0.8, 0.6, -0.5, 1.0]]
    far = [[-0.6, -0.6, 0.5, 1.0], [0.8, -0.6, 0.5, 1.0], [-0.6, 0.8, 0.5, 1.0]]
    pos = torch.tensor([(near + far) if near_first else (far + near)])
    tri = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    rast, _ = raster.rasterize(CTX, pos, tri, (32, 32))
    near_id = 1.0 if near_first else 2.0
    ids = rast[0, ..., 3]
    # A pixel inside both triangles (NDC (-0.4, -0.4)) shows the near one at depth -0.5.
    px = int((-0.4 + 1) / 2 * 32)
    assert float(ids[px, px]) == near_id
    assert float(rast[0, px, px, 2]) == pytest.approx(-0.5)
    # Where only the far triangle exists (NDC (0.5, -0.5)), it is visible.
    assert float(ids[8, 24]) == 3.0 - near_id


def test_depth_clipping_and_behind_camera() -> None:
    mvp = _mvp(3.0, 60.0)
    # Triangle entirely behind the camera (z > 0 in view space, world z > 3) is not drawn.
    verts = torch.tensor([[-1.0, -1.0, 4.0], [1.0, -1.0, 4.0], [0.0, 1.0, 4.0]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast, _ = raster.rasterize(CTX, _clip(verts, mvp), tri, (16, 16))
    assert float(rast[..., 3].max()) == 0.0


def test_range_mode_matches_instanced() -> None:
    verts, tri = _sphere(2)
    pos = _clip(verts, _mvp())
    pos2 = torch.cat([pos, pos * torch.tensor([1.0, 0.8, 1.0, 1.0])], dim=0)     # [2, V, 4]
    rast_i, db_i = raster.rasterize(CTX, pos2, tri, (40, 40))
    # Range mode: both meshes in one vertex buffer, triangles offset for the second one.
    v = verts.shape[0]
    pos_r = pos2.reshape(-1, 4).contiguous()
    tri_r = torch.cat([tri, tri + v])
    ranges = torch.tensor([[0, tri.shape[0]], [tri.shape[0], tri.shape[0]]], dtype=torch.int32)
    rast_r, db_r = raster.rasterize(CTX, pos_r, tri_r, (40, 40), ranges=ranges)
    assert torch.equal(rast_r[0], rast_i[0])
    assert torch.allclose(rast_r[1, ..., :3], rast_i[1, ..., :3])
    assert torch.equal(rast_r[1, ..., 3] > 0, rast_i[1, ..., 3] > 0)
    assert torch.equal((rast_r[1, ..., 3] - tri.shape[0]).clamp(min=0), rast_i[1, ..., 3])


def test_rast_db_and_attribute_derivatives() -> None:
    verts = torch.tensor([[-1.0, -1.0, 0.8], [1.0, -1.0, -0.8], [0.0, 1.0, 0.0]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    rast, db = raster.rasterize(CTX, _clip(verts, _mvp(3.0, 60.0)), tri, (64, 64))
    cov = rast[0, ..., 3] > 0
    inner = cov[1:-1, 1:-1] & cov[1:-1, 2:] & cov[1:-1, :-2] & cov[2:, 1:-1] & cov[:-2, 1:-1]
    u = rast[0, ..., 0]
    du_dx = (u[1:-1, 2:] - u[1:-1, :-2]) / 2                     # central differences per pixel
    du_dy = (u[2:, 1:-1] - u[:-2, 1:-1]) / 2
    assert torch.allclose(db[0, 1:-1, 1:-1, 0][inner], du_dx[inner], atol=2e-4)
    assert torch.allclose(db[0, 1:-1, 1:-1, 1][inner], du_dy[inner], atol=2e-4)
    attr = torch.tensor([[0.0, 5.0], [1.0, 6.0], [2.0, -1.0]])
    out, out_db = raster.interpolate(attr, rast, tri, rast_db=db, diff_attrs=[1])
    assert out_db.shape == (1, 64, 64, 2)
    a1 = out[0, ..., 1]
    da_dx = (a1[1:-1, 2:] - a1[1:-1, :-2]) / 2
    assert torch.allclose(out_db[0, 1:-1, 1:-1, 0][inner], da_dx[inner], atol=2e-3)
    _, all_db = raster.interpolate(attr, rast, tri, rast_db=db, diff_attrs="all")
    assert torch.allclose(all_db[..., 2:4], out_db)
    _, none_db = raster.interpolate(attr, rast, tri)
    assert none_db.shape == (1, 64, 64, 0)


def test_interpolate_gradients_reach_vertices_through_barycentrics() -> None:
    verts = torch.tensor([[-1.0, -1.0, 0.3], [1.0, -0.9, -0.2], [0.1, 1.0, 0.0]])
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    attr = torch.tensor([[1.0], [3.0], [-2.0]], requires_grad=True)
    weights = torch.rand(1, 32, 32, 1, generator=torch.Generator().manual_seed(0))
    mvp = _mvp(3.0, 60.0)

    def loss(v: torch.Tensor) -> torch.Tensor:
        pos = _clip(v, mvp)
        rast, _ = raster.rasterize(CTX, pos, tri, (32, 32))
        out, _ = raster.interpolate(attr, rast, tri)
        return (out * weights).sum(), rast

    v = verts.clone().requires_grad_(True)
    value, rast0 = loss(v)
    value.backward()
    assert attr.grad is not None and float(attr.grad.abs().sum()) > 0
    # Move vertex 2 along its view ray: the projection (coverage) stays, the depth and with it the
    # perspective-correct barycentrics change, so the whole signal is the barycentric gradient.
    eps = 1e-3
    direction = torch.zeros(3, 3)
    ray = verts[2] - torch.tensor([0.0, 0.0, 3.0])
    direction[2] = ray / ray.norm()
    with torch.no_grad():
        lp, rp = loss(verts + eps * direction)
        lm, rm = loss(verts - eps * direction)
    assert torch.equal(rp[..., 3], rast0[..., 3]) and torch.equal(rm[..., 3], rast0[..., 3])
    fd = float(lp - lm) / (2 * eps)
    analytic = float((v.grad * direction).sum())
    assert analytic == pytest.approx(fd, rel=2e-2)


def _aa_sum(pos: torch.Tensor, tri: torch.Tensor, res: int, weights: torch.Tensor, method: str) -> torch.Tensor:
    rast, _ = raster.rasterize(CTX, pos, tri, (res, res))
    colour, _ = raster.interpolate(torch.ones(1, pos.shape[1], 1), rast, tri)
    return (raster.antialias(colour, rast, pos, tri, method=method) * weights).sum()


@pytest.mark.parametrize("method", raster.ANTIALIAS_METHODS)
@pytest.mark.parametrize("axis", [0, 1])   # 0: shift in x (mostly vertical edge), 1: shift in y
def test_antialias_gradient_predicts_one_pixel_edge_shift(axis: int, method: str) -> None:
    res = 64
    base = torch.tensor([[-0.7, -0.8, 0.0, 1.0], [0.33 * 1.3, -0.6 * 1.3, 0.0, 1.3], [0.1, 0.9, 0.0, 1.0]])
    if axis == 1:
        base = base[:, [1, 0, 2, 3]]                                  # transpose the picture
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    weights = 1.0 + 0.5 * torch.linspace(0, 1, res)[None, :, None, None].expand(1, res, res, 1)
    pos = base[None].clone().requires_grad_(True)
    value = _aa_sum(pos, tri, res, weights, method)
    value.backward()
    assert pos.grad is not None and torch.isfinite(pos.grad).all()
    # Move vertices 1 and 2 by exactly one pixel along `axis` (scaled by w: clip space).
    delta = torch.zeros_like(base)
    delta[1, axis] = 2.0 / res * base[1, 3]
    delta[2, axis] = 2.0 / res * base[2, 3]
    predicted = float((pos.grad[0] * delta).sum())
    with torch.no_grad():
        actual = float(_aa_sum((base + delta)[None], tri, res, weights, method) - value)
    assert abs(predicted) > 5.0
    assert predicted == pytest.approx(actual, rel=0.10)


@pytest.mark.parametrize("method", raster.ANTIALIAS_METHODS)
def test_antialias_leaves_interior_edges_alone(method: str) -> None:
    # Two triangles of one quad: the shared diagonal is not a silhouette, so nothing changes there.
    pos = torch.tensor([[[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.5, 0.5, 0.0, 1.0],
                         [-0.5, 0.5, 0.0, 1.0]]])
    tri = torch.tensor([[0, 1, 2], [0, 2, 3]], dtype=torch.int32)
    rast, _ = raster.rasterize(CTX, pos, tri, (32, 32))
    colour = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1)) * (rast[..., 3:] > 0)
    out = raster.antialias(colour, rast, pos, tri, method=method)
    changed = (out != colour).any(-1)[0]
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[10:22, 10:22] = True                                        # well inside the quad
    assert not bool(changed[inside].any())


def test_input_validation() -> None:
    pos = torch.zeros(1, 3, 4)
    tri = torch.tensor([[0, 1, 2]], dtype=torch.int32)
    with pytest.raises(RasterInputError, match="tri.*int32"):
        raster.rasterize(CTX, pos, tri.long(), (8, 8))
    with pytest.raises(RasterInputError, match="pos.*float32"):
        raster.rasterize(CTX, pos.double(), tri, (8, 8))
    with pytest.raises(RasterInputError, match=r"pos.*\[B, V, 4\]"):
        raster.rasterize(CTX, torch.zeros(1, 3, 3), tri, (8, 8))
    with pytest.raises(RasterInputError, match="ranges"):
        raster.rasterize(CTX, torch.zeros(3, 4), tri, (8, 8))
    with pytest.raises(RasterInputError, match="resolution"):
        raster.rasterize(CTX, pos, tri, (0, 8))
    rast, _ = raster.rasterize(CTX, pos, tri, (8, 8))
    with pytest.raises(RasterInputError, match="rast_db"):
        raster.interpolate(torch.zeros(3, 2), rast, tri, diff_attrs=[0])
    with pytest.raises(RasterInputError, match="diff_attrs"):
        raster.interpolate(torch.zeros(3, 2), rast, tri, rast_db=rast, diff_attrs=[5])
    with pytest.raises(RasterInputError, match="color"):
        raster.antialias(torch.zeros(1, 4, 4, 3), rast, pos, tri)
    with pytest.raises(RasterInputError, match="backend"):
        raster.make_context("cpu", backend="opengl")


def test_backend_selection() -> None:
    assert raster.make_context("cpu").backend == "torch"
    assert raster.make_context("cpu", backend="torch").backend == "torch"
    with pytest.raises(RasterBackendError, match="CUDA"):
        raster.make_context("cpu", backend="nvdiffrast")
    tex = torch.zeros(1, 4, 4, 3)
    uv = torch.zeros(1, 2, 2, 2)
    with pytest.raises(RasterBackendError, match="CUDA"):
        raster.texture(tex, uv, backend="nvdiffrast")


def test_missing_nvdiffrast_is_an_error_when_asked_for_and_a_warned_fallback_under_auto(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A CUDA machine without nvdiffrast: its import error is the reason given."""
    monkeypatch.setattr(raster, "_nvdiffrast", None)
    monkeypatch.setattr(raster, "_nvdiffrast_import_error", ImportError("No module named 'nvdiffrast'"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RasterBackendError, match=r"cannot import nvdiffrast.torch \(No module named 'nvdiffrast'\)"):
        raster.make_context("cuda:0", backend="nvdiffrast")
    with caplog.at_level("WARNING", logger=raster.log.name):
        ctx = raster.make_context("cuda:0", backend="auto")
    assert ctx.backend == "torch" and ctx.device == torch.device("cuda:0")
    assert "No module named 'nvdiffrast'" in caplog.text


def test_explicit_nvdiffrast_refuses_cpu_tensors_once_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    # On a GPU machine nvdiffrast is usually loaded by an earlier call; CPU tensors must still get
    # the clear error instead of reaching the CUDA plugin (it failed there with a CUDAGuard error).
    monkeypatch.setattr(raster, "_nv_module", object())
    with pytest.raises(RasterBackendError, match="CUDA"):
        raster.texture(torch.zeros(1, 4, 4, 3), torch.zeros(1, 2, 2, 2), backend="nvdiffrast")
