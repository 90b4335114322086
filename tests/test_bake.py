"""UV unwrap + texture baking: orientation, padding, normal-map validity, render round trip."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from render import raster
from render.bake import BakeError, BakedMaps, bake, normalize_normal_map, rasterize_uv, uv_padding
from render.export import TEXTURE_FILES, read_png_rgb, srgb_to_linear, write_obj
from render.mesh import Mesh, MeshError, load_mesh
from render.uv import ChartOptions, PackOptions, _spatial_chunks, chart_count, unwrap, uv_island_labels

TEXTURE_RES = 1024
PSNR_MIN_DB = 30.0


def _icosphere(subdivisions: int) -> Mesh:
    s = trimesh.creation.icosphere(subdivisions=subdivisions)   # 4 -> 5120 faces
    return Mesh(v_pos=torch.tensor(s.vertices, dtype=torch.float32),
                t_pos_idx=torch.tensor(s.faces, dtype=torch.int64))


def smooth_material(points_nx3: torch.Tensor) -> dict[str, torch.Tensor]:
    """A smooth procedural stand-in for the material MLP (same output ranges)."""
    x, y, z = points_nx3.unbind(-1)
    kd = torch.stack([0.5 + 0.4 * torch.sin(8 * x + 1), 0.5 + 0.4 * torch.cos(6 * y - 3 * z),
                      0.5 + 0.4 * torch.sin(7 * z + 2 * x)], dim=-1)
    ks = torch.stack([0.2 + 0.1 * torch.sin(2 * y), 0.5 + 0.3 * torch.cos(3 * x),
                      0.5 + 0.4 * torch.sin(2 * z)], dim=-1)
    nrm = torch.stack([0.3 * torch.sin(4 * y), 0.3 * torch.cos(3 * z + x), torch.ones_like(x)], dim=-1)
    return {"kd": kd, "ks": ks, "nrm": nrm}


@pytest.fixture(scope="module", params=[0, 700], ids=["whole", "pieces"])
def baked_sphere(request: pytest.FixtureRequest) -> tuple[Mesh, BakedMaps]:
    """The 5120-face sphere unwrapped whole, and in pieces of <= 700 faces (one atlas, 8 pieces):
    overlapping or misassigned pieces would fail the bake and render round trips below."""
    mesh = unwrap(_icosphere(4), pack_options=PackOptions(padding=2), max_chunk_faces=request.param)
    return mesh, bake(mesh, smooth_material, TEXTURE_RES, uv_padding_block=4)


# ----------------------------------------------------------------------------------------------
# Unwrap


def test_unwrap_keeps_faces_and_gives_uvs_in_unit_square() -> None:
    mesh = _icosphere(2)
    out = unwrap(mesh)
    assert torch.equal(out.t_pos_idx, mesh.t_pos_idx) and torch.equal(out.v_pos, mesh.v_pos)
    assert out.t_tex_idx.shape == mesh.t_pos_idx.shape
    assert float(out.v_tex.min()) >= 0.0 and float(out.v_tex.max()) <= 1.0
    # Each chart is consistently oriented (xatlas may mirror whole charts, never fold one).
    t = out.v_tex[out.t_tex_idx]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    area = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    labels = uv_island_labels(out.t_tex_idx)
    for chart in np.unique(labels):
        positive = float((area[labels == chart] > 0).float().mean())
        assert positive in (0.0, 1.0), f"chart {chart} is folded: {positive:.2f} of its faces positive"


def test_unwrap_in_pieces_keeps_faces_and_one_atlas() -> None:
    mesh = _icosphere(4)                                               # 5120 faces
    out = unwrap(mesh, max_chunk_faces=700)                            # 8 pieces of 640
    assert torch.equal(out.t_pos_idx, mesh.t_pos_idx)
    assert float(out.v_tex.min()) >= 0.0 and float(out.v_tex.max()) <= 1.0
    # Compact pieces of <= 700 faces, each UV island inside one piece, every UV vertex used.
    pieces = _spatial_chunks(mesh.v_pos[mesh.t_pos_idx].mean(1).numpy(), 700)
    assert len(pieces) == 8 and sorted(np.concatenate(pieces).tolist()) == list(range(5120))
    piece_of = np.empty(5120, dtype=np.int64)
    for i, faces in enumerate(pieces):
        piece_of[faces] = i
    islands = uv_island_labels(out.t_tex_idx)
    assert all(len(np.unique(piece_of[islands == k])) == 1 for k in np.unique(islands))
    assert len(np.unique(out.t_tex_idx.numpy())) == out.v_tex.shape[0]
    with pytest.raises(ValueError, match="max_chunk_faces"):
        unwrap(mesh, max_chunk_faces=-1)


def test_unwrap_chart_options_are_applied() -> None:
    mesh = _icosphere(2)
    default = chart_count(unwrap(mesh))
    small = chart_count(unwrap(mesh, chart_options=ChartOptions(max_chart_area=0.5)))
    assert small > default


def test_unwrap_rejects_negative_padding() -> None:
    with pytest.raises(ValueError, match="padding"):
        unwrap(_icosphere(1), pack_options=PackOptions(padding=-1))


# ----------------------------------------------------------------------------------------------
# Bake basics


def _plane_mesh() -> Mesh:
    """Two triangles covering the unit square with position (x, y, 0) == uv (OBJ convention)."""
    uv = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    return Mesh(v_pos=torch.cat([uv, torch.zeros(4, 1)], dim=-1), t_pos_idx=faces,
                v_tex=uv.clone(), t_tex_idx=faces.clone())


def test_bake_orientation_row0_is_top() -> None:
    def quadrant(points_nx3: torch.Tensor) -> dict[str, torch.Tensor]:
        x, y = points_nx3[:, 0], points_nx3[:, 1]
        kd = torch.stack([(x < 0.5).float(), (y > 0.5).float(), torch.zeros_like(x)], dim=-1)
        return {"kd": kd, "ks": torch.zeros_like(kd), "nrm": torch.zeros_like(kd) + torch.tensor([0, 0, 1.0])}

    maps = bake(_plane_mesh(), quadrant, 32, uv_padding_block=1)
    assert bool(maps.mask.all())
    # Image row 0 is the top, i.e. v (= y) close to 1: green set; left columns: red set.
    np.testing.assert_array_equal(maps.kd[:16, :16].reshape(-1, 3).unique(dim=0).numpy(), [[1, 1, 0]])
    np.testing.assert_array_equal(maps.kd[16:, 16:].reshape(-1, 3).unique(dim=0).numpy(), [[0, 0, 0]])


def test_bake_covered_texels_hold_material_values(baked_sphere: tuple[Mesh, BakedMaps]) -> None:
    mesh, maps = baked_sphere
    assert 0.3 < float(maps.mask.float().mean()) < 0.95
    # Independent check at a small resolution: covered texel centres lie on the (inscribed)
    # sphere surface and hold exactly the material's value there.
    small = bake(mesh, smooth_material, 128, uv_padding_block=2)
    pos_hw3, covered = rasterize_uv(mesh, small.resolution)
    assert torch.equal(covered, small.mask)
    radius = pos_hw3[covered].norm(dim=-1)
    assert float(radius.min()) > 0.98 and float(radius.max()) <= 1.0 + 1e-5
    np.testing.assert_allclose(small.kd[covered].numpy(), smooth_material(pos_hw3[covered])["kd"].numpy(),
                               atol=1e-5)


def test_bake_fills_every_texel_finite(baked_sphere: tuple[Mesh, BakedMaps]) -> None:
    _, maps = baked_sphere
    for name in ("kd", "ks", "nrm"):
        image = getattr(maps, name)
        assert image.shape == (TEXTURE_RES, TEXTURE_RES, 3) and bool(torch.isfinite(image).all()), name
    # Padding extends island colours: texels next to a covered texel are close to it.
    kd = maps.kd.numpy()
    border = ~maps.mask.numpy() & np.roll(maps.mask.numpy(), 1, axis=1)
    diff = np.abs(kd[border] - np.roll(kd, 1, axis=1)[border])
    # (a padded texel between two nearby islands blends both, so a few differ more)
    assert np.quantile(diff.max(axis=-1), 0.98) < 0.02, np.quantile(diff.max(axis=-1), [0.5, 0.9, 0.98, 1.0])


def test_bake_refuses_non_finite_material() -> None:
    def broken(points_nx3: torch.Tensor) -> dict[str, torch.Tensor]:
        out = smooth_material(points_nx3)
        out["ks"][0, 1] = float("nan")
        return out

    with pytest.raises(BakeError, match="NaN"):
        bake(_plane_mesh(), broken, 16)


def test_bake_needs_uvs() -> None:
    with pytest.raises(MeshError, match="no UVs"):
        bake(_icosphere(1), smooth_material, 16)


def test_uv_padding_tiles_and_empty_tiles() -> None:
    image = np.zeros((64, 64, 2), np.float32)
    known = np.zeros((64, 64), bool)
    known[4:20, 4:20] = True
    image[known] = (0.25, 0.75)
    out = uv_padding(image, known, blocks=2)
    # The tile holding the island is filled from it; tiles without known texels get the mean.
    np.testing.assert_allclose(out[:32, :32].reshape(-1, 2).min(0), (0.25, 0.75), atol=1e-5)
    np.testing.assert_allclose(out[:32, :32].reshape(-1, 2).max(0), (0.25, 0.75), atol=1e-5)
    np.testing.assert_allclose(out[40, 40], (0.25, 0.75), atol=1e-6)
    # A smooth channel is extended smoothly and stays within the known range (OpenCV's float
    # Telea is unusable on [0, 1] data without rescaling: it returned a +-1 checkerboard).
    yy, xx = np.mgrid[:64, :64]
    smooth = (0.5 + 0.3 * np.sin(xx / 7.0) + 0.1 * np.cos(yy / 5.0)).astype(np.float32)[..., None]
    out = uv_padding(np.where(known[..., None], smooth, 0.0), known, blocks=1)[..., 0]
    assert smooth[known].min() - 1e-6 <= out.min() and out.max() <= smooth[known].max() + 1e-6
    assert np.abs(out[20, 4:20] - smooth[19, 4:20, 0]).max() < 0.02     # first padded row
    with pytest.raises(ValueError, match="uv_padding_block"):
        uv_padding(image, known, blocks=0)


# ----------------------------------------------------------------------------------------------
# Normal map


def test_normalize_normal_map_forces_unit_and_z_nonnegative() -> None:
    n = torch.tensor([[[0.0, 0.0, -1.0], [3.0, 0.0, 4.0], [0.6, 0.0, -0.8]]])
    out = normalize_normal_map(n)
    np.testing.assert_allclose(out.norm(dim=-1).numpy(), 1.0, atol=1e-6)
    assert bool((out[..., 2] >= 0).all())
    np.testing.assert_allclose(out[0, 0].numpy(), [0, 0, 1])
    np.testing.assert_allclose(out[0, 1].numpy(), [0.6, 0, 0.8], atol=1e-6)


def test_written_normal_map_decodes_to_unit_vectors(baked_sphere: tuple[Mesh, BakedMaps],
                                                    tmp_path: Path) -> None:
    mesh, maps = baked_sphere
    write_obj(tmp_path, mesh, maps)
    nrm = read_png_rgb(tmp_path / TEXTURE_FILES["nrm"]).astype(np.float64) / 255.0 * 2.0 - 1.0
    length = np.linalg.norm(nrm, axis=-1)
    assert np.abs(length - 1.0).max() < 0.02
    assert nrm[..., 2].min() >= 0.0


# ----------------------------------------------------------------------------------------------
# Round trip: renders of the baked textured mesh vs renders of the material


def _mvp(azimuth: float, elevation: float, distance: float = 3.0,
         fovy: float = math.radians(45)) -> torch.Tensor:
    """OpenGL-style projection @ view for a camera orbiting the origin (y up)."""
    ca, sa, ce, se = math.cos(azimuth), math.sin(azimuth), math.cos(elevation), math.sin(elevation)
    rot_y = torch.tensor([[ca, 0, sa, 0], [0, 1, 0, 0], [-sa, 0, ca, 0], [0, 0, 0, 1]], dtype=torch.float32)
    rot_x = torch.tensor([[1, 0, 0, 0], [0, ce, se, 0], [0, -se, ce, 0], [0, 0, 0, 1]], dtype=torch.float32)
    view = torch.eye(4)
    view[2, 3] = -distance
    f, near, far = 1.0 / math.tan(fovy / 2), 1.0, 50.0
    proj = torch.tensor([[f, 0, 0, 0], [0, f, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
                         [0, 0, -1, 0]], dtype=torch.float32)
    return proj @ view @ rot_x @ rot_y


def _render_views(mesh: Mesh, maps: BakedMaps,
                  res: int = 256) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per view: (material reference [B, h, w, 9], baked texture lookup [B, h, w, 9], mask [B, h, w])."""
    ctx = raster.make_context("cpu")
    num_f = mesh.t_pos_idx.shape[0]
    pos_cx3 = mesh.v_pos[mesh.t_pos_idx.reshape(-1)]                       # one vertex per corner
    uv_cx2 = mesh.v_tex[mesh.t_tex_idx.reshape(-1)]
    tri = torch.arange(3 * num_f, dtype=torch.int32).reshape(num_f, 3)
    views = [(math.radians(45 * k), math.radians(25 if k % 2 else -15)) for k in range(8)]
    mvp_bx4x4 = torch.stack([_mvp(a, e) for a, e in views])
    pos_h = torch.cat([pos_cx3, torch.ones_like(pos_cx3[:, :1])], dim=-1)
    clip_bcx4 = torch.einsum("bij,cj->bci", mvp_bx4x4, pos_h).contiguous()
    rast, _ = raster.rasterize(ctx, clip_bcx4, tri, (res, res))
    world, _ = raster.interpolate(pos_cx3, rast, tri)                        # [B, h, w, 3]
    uv, _ = raster.interpolate(uv_cx2, rast, tri)                            # [B, h, w, 2]
    mask = rast[..., 3] > 0
    ref = smooth_material(world[mask])
    ref_full = torch.zeros(*mask.shape, 9)
    ref_full[mask] = torch.cat([ref["kd"], ref["ks"], normalize_normal_map(ref["nrm"]) * 0.5 + 0.5], dim=-1)
    tex_1hwx9 = torch.cat([maps.kd, maps.ks, maps.nrm * 0.5 + 0.5], dim=-1)[None]
    uv_img = torch.stack([uv[..., 0], 1.0 - uv[..., 1]], dim=-1)           # image rows: (u, 1 - v)
    baked = torch.cat([raster.texture(tex_1hwx9, uv_img[b:b + 1].contiguous(), filter_mode="linear",
                                      boundary_mode="clamp") for b in range(uv_img.shape[0])])
    return ref_full, baked, mask


def _maps_from_files(folder: Path) -> BakedMaps:
    """Decode the written PNGs back to linear maps (what a user of the OBJ gets)."""
    kd = srgb_to_linear(read_png_rgb(folder / TEXTURE_FILES["kd"]) / 255.0)
    ks = read_png_rgb(folder / TEXTURE_FILES["ks"]) / 255.0
    nrm = read_png_rgb(folder / TEXTURE_FILES["nrm"]) / 255.0 * 2.0 - 1.0
    as_t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return BakedMaps(kd=as_t(kd), ks=as_t(ks), nrm=as_t(nrm), mask=torch.ones(kd.shape[:2], dtype=torch.bool))


def test_baked_renders_match_material_renders(baked_sphere: tuple[Mesh, BakedMaps], tmp_path: Path) -> None:
    """Full chain: bake -> write OBJ/MTL/PNGs -> load_mesh + decode PNGs -> render, vs material."""
    mesh, maps = baked_sphere
    write_obj(tmp_path, mesh, maps)
    reloaded = load_mesh(tmp_path / "mesh.obj")
    ref, baked, mask = _render_views(reloaded, _maps_from_files(tmp_path))
    for b in range(ref.shape[0]):
        m = mask[b]
        assert int(m.sum()) > 1000, "sphere not in view; camera setup is wrong"
        for name, sl in (("kd", slice(0, 3)), ("ks", slice(3, 6)), ("nrm", slice(6, 9))):
            mse = float(((ref[b][m][:, sl] - baked[b][m][:, sl]) ** 2).mean())
            psnr = 10 * math.log10(1.0 / max(mse, 1e-12))
            assert psnr >= PSNR_MIN_DB, f"view {b} {name}: PSNR {psnr:.1f} dB < {PSNR_MIN_DB}"
