"""texture_torch: nvdiffrast semantics on CPU (2D addressing, boundary modes, mips, cube maps,
seams, gradients)."""
import math

import pytest
import torch

from render.texture_torch import TextureError, build_mip_chain, texture_torch
from render.util import cube_texel_dirs, cube_to_dir, dir_to_cube


def _centres(h: int, w: int) -> torch.Tensor:
    i, j = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    return torch.stack([(j + 0.5) / w, (i + 0.5) / h], -1).float()


@pytest.mark.parametrize("boundary", ["wrap", "clamp", "zero"])
@pytest.mark.parametrize("filt", ["nearest", "linear"])
def test_2d_exact_at_texel_centres(boundary, filt):
    tex = torch.rand(2, 5, 8, 3)
    uv = _centres(5, 8)[None].expand(2, 5, 8, 2)
    out = texture_torch(tex, uv, filter_mode=filt, boundary_mode=boundary)
    assert torch.allclose(out, tex, atol=1e-6)


def test_2d_boundary_modes_and_bilinear():
    tex = torch.rand(1, 4, 4, 2)
    uv = torch.tensor([[[[0.125, 0.375]]]])  # texel (row 1, col 0)
    shifted = uv + torch.tensor([1.0, -2.0])
    assert torch.allclose(texture_torch(tex, shifted, boundary_mode="wrap"), tex[:, 1:2, 0:1], atol=1e-6)
    left = torch.tensor([[[[-0.4, 0.375]]]])
    assert torch.allclose(texture_torch(tex, left, boundary_mode="clamp"), tex[:, 1:2, 0:1], atol=1e-6)
    assert texture_torch(tex, left, boundary_mode="zero").abs().max() == 0
    # Half-way between two texels: the average; across the wrap seam: the two edge texels.
    mid = torch.tensor([[[[0.25, 0.375]]]])
    assert torch.allclose(texture_torch(tex, mid), 0.5 * (tex[:, 1:2, 0:1] + tex[:, 1:2, 1:2]), atol=1e-6)
    seam = torch.tensor([[[[0.0, 0.375]]]])
    assert torch.allclose(texture_torch(tex, seam), 0.5 * (tex[:, 1:2, 0:1] + tex[:, 1:2, 3:4]), atol=1e-6)
    # zero mode at the edge: half of the edge texel.
    assert torch.allclose(texture_torch(tex, seam, boundary_mode="zero"), 0.5 * tex[:, 1:2, 0:1], atol=1e-6)


def test_mip_chain_and_level_selection():
    tex = torch.rand(1, 16, 16, 3)
    chain = build_mip_chain(tex)
    assert [c.shape[1] for c in chain] == [8, 4, 2, 1]
    assert torch.allclose(chain[0], tex.reshape(1, 8, 2, 8, 2, 3).mean((2, 4)))
    uv = _centres(4, 4)[None]  # texel centres of level 2
    for bias, want in ((2.0, chain[1]), (2.5, 0.5 * (chain[1] + texture_torch(chain[2], uv))), (9.0, chain[3].expand(1, 4, 4, 3))):
        out = texture_torch(tex, uv, mip_level_bias=torch.full((1, 4, 4), bias))
        assert torch.allclose(out, want, atol=1e-6), bias
    # A custom chain gives the same result as the built one.
    out_custom = texture_torch(tex, uv, mip=chain, mip_level_bias=torch.full((1, 4, 4), 2.5))
    out_built = texture_torch(tex, uv, mip_level_bias=torch.full((1, 4, 4), 2.5))
    assert torch.allclose(out_custom, out_built)
    # uv_da of 4 texels per pixel selects level 2.
    da = torch.tensor([4 / 16, 0.0, 0.0, 4 / 16]).expand(1, 4, 4, 4)
    assert torch.allclose(texture_torch(tex, uv, uv_da=da), chain[1], atol=1e-5)
    assert torch.allclose(texture_torch(tex, uv, uv_da=da, max_mip_level=1), texture_torch(chain[0], uv), atol=1e-5)


def test_cube_face_orientation_matches_nvdiffrast():
    # Expected (face, s, t) from nvdiffrast's indexCubeMap for sample directions.
    cases = [((1.0, 0.5, -0.25), (0, 0.625, 0.25)), ((-1.0, 0.5, -0.25), (1, 0.375, 0.25)),
             ((0.5, 1.0, -0.25), (2, 0.75, 0.375)), ((0.5, -1.0, -0.25), (3, 0.75, 0.625)),
             ((0.5, -0.25, 1.0), (4, 0.75, 0.625)), ((0.5, -0.25, -1.0), (5, 0.25, 0.625))]
    for d, (f, s, t) in cases:
        face, ss, tt, ok = dir_to_cube(torch.tensor(d))
        assert ok and face.item() == f and math.isclose(ss.item(), s) and math.isclose(tt.item(), t), d
        back = cube_to_dir(face, ss, tt)
        assert torch.allclose(back / back.abs().max(), torch.tensor(d) / max(abs(x) for x in d))


def test_cube_exact_at_texel_centres_and_invalid_dirs():
    r = 8
    tex = torch.rand(1, 6, r, r, 4)
    dirs = cube_texel_dirs(r).reshape(1, 6 * r, r, 3)
    out = texture_torch(tex, dirs, boundary_mode="cube")
    assert torch.allclose(out.reshape(tex.shape), tex, atol=1e-5)
    bad = torch.tensor([[[[0.0, 0.0, 0.0], [float("nan"), 1.0, 0.0]]]])
    assert texture_torch(tex, bad, boundary_mode="cube").abs().max() == 0


@pytest.mark.parametrize("mip_bias", [None, 1.5])
def test_cube_lookups_continuous_across_every_edge_and_corner(mip_bias):
    torch.manual_seed(0)
    r = 16
    tex = torch.rand(1, 6, r, r, 3)
    eps = 1e-5
    along = torch.linspace(0.02, 0.98, 25)
    worst = 0.0
    for face in range(6):
        for edge in range(4):  # s = 0, s = 1, t = 0, t = 1
            on_s = edge < 2
            e = float(edge % 2)
            fixed = torch.full_like(along, e)
            inward = 1.0 - 2.0 * e
            s_in, t_in = (fixed + eps * inward, along) if on_s else (along, fixed + eps * inward)
            s_out, t_out = (fixed - eps * inward, along) if on_s else (along, fixed - eps * inward)
            f = torch.full_like(along, face, dtype=torch.long)
            d_in, d_out = cube_to_dir(f, s_in, t_in), cube_to_dir(f, s_out, t_out)
            assert (dir_to_cube(d_out)[0] != face).all()  # the outside point is on the neighbour face
            kw = {} if mip_bias is None else {"mip_level_bias": torch.full((1, 1, 25), mip_bias)}
            a = texture_torch(tex, d_in[None, None], boundary_mode="cube", **kw)
            b = texture_torch(tex, d_out[None, None], boundary_mode="cube", **kw)
            worst = max(worst, (a - b).abs().max().item())
    assert worst < 1e-3  # a texel-sized step would be ~0.3 for random texels
    for corner in torch.tensor([[x, y, z] for x in (1, -1) for y in (1, -1) for z in (1, -1)], dtype=torch.float32):
        pts = corner + 1e-4 * torch.eye(3) * corner  # just inside each of the three faces
        vals = texture_torch(tex, pts[None, None], boundary_mode="cube")[0, 0]
        assert (vals - vals[0]).abs().max() < 1e-2


def test_tex_batch_broadcast_and_errors():
    tex = torch.rand(1, 4, 4, 3)
    uv = torch.rand(3, 2, 2, 2)
    out = texture_torch(tex, uv)
    assert out.shape == (3, 2, 2, 3)
    assert torch.allclose(out[1], texture_torch(tex, uv[1:2])[0])
    with pytest.raises(TextureError, match="boundary_mode"):
        texture_torch(tex, uv, boundary_mode="mirror")
    with pytest.raises(TextureError, match="tex minibatch"):
        texture_torch(torch.rand(2, 4, 4, 3), uv)
    with pytest.raises(TextureError, match="needs uv_da or mip_level_bias"):
        texture_torch(tex, uv, filter_mode="linear-mipmap-linear")
    with pytest.raises(TextureError, match="odd extent"):
        texture_torch(torch.rand(1, 6, 6, 3), uv, mip_level_bias=torch.zeros(3, 2, 2))
    with pytest.raises(TextureError, match=r"mip\[0\]"):
        texture_torch(tex, uv, mip=[torch.rand(1, 3, 3, 3)], mip_level_bias=torch.zeros(3, 2, 2))


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    tex = torch.rand(1, 8, 8, 2, dtype=torch.float64, requires_grad=True)
    # Keep uv away from texel centres (bilinear kinks) so central differences are valid.
    uv = (torch.tensor([[[[0.23, 0.41], [0.77, 0.12]]]], dtype=torch.float64)).requires_grad_(True)
    bias = torch.tensor([[[0.7, 1.3]]], dtype=torch.float64, requires_grad=True)
    for mode in ("wrap", "clamp", "zero"):
        assert torch.autograd.gradcheck(lambda t, u: texture_torch(t, u, boundary_mode=mode), (tex, uv))
    assert torch.autograd.gradcheck(lambda t, u, b: texture_torch(t, u, mip_level_bias=b), (tex, uv, bias))
    ctex = torch.rand(1, 6, 4, 4, 2, dtype=torch.float64, requires_grad=True)
    d = torch.tensor([[[[0.9, 0.31, -0.52], [-0.2, 0.95, 0.93]]]], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, u: texture_torch(t, u, boundary_mode="cube"), (ctex, d))
    assert torch.autograd.gradcheck(
        lambda t, u, b: texture_torch(t, u, mip_level_bias=b, boundary_mode="cube"), (ctex, d, bias))
