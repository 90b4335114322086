"""SDF init shapes, transforms, degenerate inputs and CPU pretraining quality (grid 32)."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from geometry.dmtet import DMTetGeometry
from geometry.fixed_mesh import FixedMeshGeometry
from geometry.hashgrid import HashGridOptions
from geometry.sdf_init import (LOOSE_FIT_MSE, InitShape, InitShapeOptions, SdfInitError, SdfInitWarning,
                               check_pretraining_fit, check_shape_in_grid, make_training_samples, pretrain_sdf)
from render.mesh import Mesh, load_mesh

igl = pytest.importorskip("igl")
trimesh = pytest.importorskip("trimesh")

# A 2^14 table keeps the CPU pretraining tests at seconds; the defaults (2^19) are the same code.
CPU_GRID = HashGridOptions(log2_hashmap_size=14)


@pytest.fixture
def one_thread():
    """The CPU reference is many small ops; OpenMP threads on a shared 2-core box only contend."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _write_obj(path: Path, verts: np.ndarray, faces: np.ndarray) -> Path:
    lines = [f"v {x!r} {y!r} {z!r}" for x, y, z in verts.tolist()]
    lines += [f"f {a + 1} {b + 1} {c + 1}" for a, b, c in faces.tolist()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _torus_with_hole(path: Path, major: float = 1.0, minor: float = 0.45) -> Path:
    m = trimesh.creation.torus(major_radius=major, minor_radius=minor, major_sections=48,
                               minor_sections=24)
    centroids = m.triangles_center
    keep = ~((centroids[:, 0] > major) & (np.abs(centroids[:, 1]) < 0.25))  # cut the outer wall
    assert (~keep).sum() > 0
    return _write_obj(path, np.asarray(m.vertices), np.asarray(m.faces)[keep])


def _iou(geo: DMTetGeometry, inside_gt, mesh_scale: float, n: int = 200_000) -> float:
    with torch.no_grad():
        verts, faces = geo.extract()
    q = (np.random.default_rng(1).random((n, 3)) - 0.5) * mesh_scale
    pred = igl.fast_winding_number(verts.double().numpy(), faces.numpy(), q) > 0.5
    gt = inside_gt(q)
    return float((pred & gt).sum() / (pred | gt).sum())


# ----------------------------------------------------------------------------------------------
# Shapes and transforms

def test_transform_order_scale_rotate_translate() -> None:
    shape = InitShape(InitShapeOptions("ellipsoid", (0.5, 1.0, 0.25), 90.0, 0.1, -0.2))
    # local +y tip (0, 1, 0): scaled (0, 1, 0), rotated +90 about x -> (0, 0, 1), then shifted.
    tips = np.array([[0.0, 0.1, 0.8], [0.5, 0.1, -0.2], [0.0, 0.35, -0.2]])
    assert np.allclose(shape.sdf(tips), 0.0, atol=1e-9)
    assert np.isclose(shape.sdf(np.array([[0.0, 0.1, -0.2]]))[0], -0.25)
    assert shape.sdf(np.array([[0.0, 0.0, 2.0]]))[0] > 0
    assert np.allclose(shape.sdf(shape.verts), 0.0, atol=0.02)  # mesh approximates the surface


def test_cylinder_dimensions_and_axis() -> None:
    shape = InitShape(InitShapeOptions("cylinder"))
    pts = np.array([[0.75, 0, 0], [0, 0, 0.4], [0, 0, 0], [0, 1.0, 0]])
    assert np.allclose(shape.sdf(pts), [0, 0, -0.4, 0.25])
    standing = InitShape(InitShapeOptions("cylinder", rotate_x_deg=-90))
    assert np.isclose(standing.sdf(np.array([[0, 0.4, 0]]))[0], 0.0, atol=1e-9)


def test_custom_mesh_is_unit_sized_and_open_mesh_signs_are_robust(tmp_path: Path) -> None:
    torus = trimesh.creation.torus(major_radius=1.0, minor_radius=0.45)
    path = _torus_with_hole(tmp_path / "torus.obj")
    raw = trimesh.load(path, process=False)
    shifted = _write_obj(tmp_path / "far.obj", np.asarray(raw.vertices) * 7 + 30, np.asarray(raw.faces))
    shape = InitShape(InitShapeOptions("custom_mesh", base_mesh=str(shifted)))
    assert np.isclose(np.linalg.norm(shape.verts - shape.verts.mean(0), axis=1).max(), 1.0)
    assert np.abs(shape.verts.mean(0)).max() < 1e-6
    scale = 1.0 / np.linalg.norm(np.asarray(torus.vertices), axis=1).max()
    tube = np.array([[1.0 * scale, 0, 0], [-1.0 * scale, 0, 0], [0, 1.0 * scale, 0]])
    sd = shape.sdf(tube)
    assert (sd < 0).all(), "winding-number sign: tube centres inside despite the hole"
    assert shape.sdf(np.zeros((1, 3)))[0] > 0  # the torus hole is outside


def test_samples_follow_design() -> None:
    shape = InitShape(InitShapeOptions("ellipsoid", (0.6, 0.85, 0.6)))
    pts, sdf = make_training_samples(shape, 2.1, n_surface=1000, n_near=2000, n_uniform=3000)
    assert pts.shape == (6000, 3) and sdf.shape == (6000,) and pts.dtype == torch.float32
    assert torch.all(sdf[:1000] == 0)
    assert np.allclose(shape.sdf(pts[:1000].double().numpy()), 0, atol=5e-3)
    assert 0.02 < float(sdf[1000:3000].abs().mean()) < 0.06  # |N(0, 0.05)| ~ 0.04 mean
    assert float(pts[3000:].abs().max()) <= 1.05


# ----------------------------------------------------------------------------------------------
# Degenerate inputs

@pytest.mark.parametrize("kwargs, key", [
    (dict(shape="sphere"), "sdf_init_shape"),
    (dict(scale=(1.0, 0.0, 1.0)), "sdf_init_shape_scale"),
    (dict(scale=(1.0, float("nan"), 1.0)), "sdf_init_shape_scale"),
    (dict(scale=(1.0, 1.0)), "sdf_init_shape_scale"),
    (dict(translation_y=float("inf")), "translation_y"),
    (dict(shape="custom_mesh"), "base_mesh"),
])
def test_bad_options_name_the_key(kwargs: dict, key: str) -> None:
    with pytest.raises(SdfInitError, match=key):
        InitShapeOptions(**kwargs)


def test_planar_mesh_is_rejected(tmp_path: Path) -> None:
    grid = np.stack(np.meshgrid(np.arange(3.0), np.arange(3.0), indexing="ij"), -1).reshape(-1, 2)
    verts = np.c_[grid, np.full(9, 0.5)] @ np.array([[1, 0, 0], [0, 0.6, 0.8], [0, -0.8, 0.6]])
    faces = np.array([[0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [3, 4, 7], [3, 7, 6]])
    path = _write_obj(tmp_path / "plane.obj", verts, faces)
    with pytest.raises(SdfInitError, match="plane"):
        InitShape(InitShapeOptions("custom_mesh", base_mesh=str(path)))


def test_nan_mesh_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "nan.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 nan 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    with pytest.raises(ValueError, match="(?i)nan|finite"):  # MeshError or SdfInitError
        InitShape(InitShapeOptions("custom_mesh", base_mesh=str(path)))


def test_shape_outside_grid_is_error_and_overhang_warns() -> None:
    far = InitShape(InitShapeOptions("ellipsoid", (0.3, 0.3, 0.3), translation_y=3.0))
    with pytest.raises(SdfInitError, match="entirely outside"):
        check_shape_in_grid(far, mesh_scale=2.0)
    big = InitShape(InitShapeOptions("ellipsoid", (1.2, 1.2, 1.2)))
    with pytest.warns(SdfInitWarning, match="mesh_scale >="):
        check_shape_in_grid(big, mesh_scale=2.0)
    tiny = InitShape(InitShapeOptions("ellipsoid", (0.05, 0.05, 0.05)))
    with pytest.warns(SdfInitWarning, match="two tet grid cells"):
        check_shape_in_grid(tiny, mesh_scale=2.0, grid_res=32)


# ----------------------------------------------------------------------------------------------
# Pretraining quality (acceptance: IoU >= 0.9 ellipsoid, >= 0.85 open user mesh, grid 32, CPU)

@pytest.mark.slow
def test_pretrain_ellipsoid_iou(one_thread) -> None:
    torch.manual_seed(0)
    mesh_scale = 2.1
    shape = InitShape(InitShapeOptions("ellipsoid", (0.6, 0.85, 0.6), translation_y=-0.1))
    geo = DMTetGeometry(32, mesh_scale, CPU_GRID, backend="torch")
    loss = pretrain_sdf(geo, shape, iters=400, batch_size=2048)
    assert isinstance(loss, float) and loss < 1e-3
    iou = _iou(geo, lambda q: shape.sdf(q) < 0, mesh_scale)
    assert iou >= 0.9, iou


@pytest.mark.slow
def test_pretraining_does_not_memorize_its_samples(one_thread) -> None:
    """Production hash grid (16 levels, 2^19 entries) at grid 64: every grid vertex farther than a
    cell from the ellipsoid gets the right sign. The fixed 100k-point sample set the pretraining
    once used was memorized by the fine levels: 1234 such vertices had the wrong sign after these
    200 steps (hollow, fragmented starts; 14k at grid 128 after 400 steps of 10240), against 7 with
    a fresh batch every step."""
    torch.manual_seed(0)
    shape = InitShape(InitShapeOptions("ellipsoid", (0.56, 0.56, 0.84)))
    geo = DMTetGeometry(64, 2.3, backend="torch")
    pretrain_sdf(geo, shape, iters=200, batch_size=4096)
    with torch.no_grad():
        sdf, _ = geo.sdf_and_deform()
    truth = torch.from_numpy(shape.sdf(geo.grid_verts.double().numpy()))
    far = truth.abs() > 2.3 / 64                                  # a grid cell (half-edge) or more away
    wrong = int(((sdf < 0) != (truth < 0))[far].sum())
    assert wrong <= 40, wrong


def test_short_pretraining_warns_of_a_loose_fit(one_thread) -> None:
    # 5 steps leave the ellipsoid far from fitted; the training phase's check (rank 0) warns, naming
    # the key to raise.
    torch.manual_seed(0)
    shape = InitShape(InitShapeOptions("ellipsoid", (0.6, 0.85, 0.6)))
    geo = DMTetGeometry(16, 2.1, CPU_GRID, backend="torch")
    loss = pretrain_sdf(geo, shape, iters=5, batch_size=2048)
    assert loss > LOOSE_FIT_MSE
    with pytest.warns(SdfInitWarning, match=r"after 5 steps \(above 1\.5e-04\): .* raise sdf_init_iter \(e\.g\. 2000\)"):
        check_pretraining_fit(loss, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SdfInitWarning)
        # The fits measured on the GPU that trained (2.7e-5: 16 levels, 1.3e-6: 2000 steps) pass.
        check_pretraining_fit(2.7e-5, 400)
        check_pretraining_fit(1.3e-6, 2000)
    with pytest.warns(SdfInitWarning):
        check_pretraining_fit(1.8e-4, 400)     # 7 levels at seed 42: vanished after 19 steps


@pytest.mark.slow
def test_pretrain_open_torus_mesh_iou(tmp_path: Path, one_thread) -> None:
    torch.manual_seed(0)
    mesh_scale = 2.4
    path = _torus_with_hole(tmp_path / "torus_hole.obj")
    opts = InitShapeOptions("custom_mesh", (1.0, 1.0, 1.0), rotate_x_deg=90, translation_y=0.1,
                            base_mesh=str(path))
    shape = InitShape(opts)
    geo = DMTetGeometry(32, mesh_scale, CPU_GRID, backend="torch")
    pretrain_sdf(geo, shape, iters=400, batch_size=2048)

    # Ground truth: the analytic (closed) torus under the same normalization and transform.
    v = load_mesh(path).v_pos.double().numpy()
    centre, radius = v.mean(0), np.linalg.norm(v - v.mean(0), axis=1).max()

    def inside(q: np.ndarray) -> np.ndarray:
        p = shape.to_local(q) * radius + centre  # back to the file's units
        ring = np.hypot(p[:, 0], p[:, 1]) - 1.0
        return np.hypot(ring, p[:, 2]) < 0.45

    iou = _iou(geo, inside, mesh_scale)
    assert iou >= 0.85, iou


# ----------------------------------------------------------------------------------------------
# Fixed-mesh geometry (appearance phase)

def test_fixed_mesh_unwraps_and_builds_frames(tmp_path: Path, caplog) -> None:

    path = _write_obj(tmp_path / "box.obj", np.asarray(trimesh.creation.box().vertices) * 2 + 5,
                      np.asarray(trimesh.creation.box().faces))
    with caplog.at_level("INFO", logger="geometry.fixed_mesh"):
        geo = FixedMeshGeometry(path)
    assert geo.unwrapped and "xatlas" in caplog.text
    m = geo.mesh()
    assert m.v_tex is not None and m.v_nrm is not None and m.v_tng is not None
    assert m.t_tex_idx.shape == m.t_pos_idx.shape
    assert torch.allclose(geo.aabb, torch.tensor([[4.0] * 3, [6.0] * 3]))
    unit = FixedMeshGeometry(path, normalize=True)
    assert torch.isclose(unit.mesh().v_pos.norm(dim=1).max(), torch.tensor(1.0))


def test_fixed_mesh_keeps_existing_uvs_and_pads_flat_aabb() -> None:


    quad = Mesh(v_pos=torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]),
                t_pos_idx=torch.tensor([[0, 1, 2], [0, 2, 3]]),
                v_tex=torch.tensor([[0.0, 0], [1, 0], [1, 1], [0, 1]]),
                t_tex_idx=torch.tensor([[0, 1, 2], [0, 2, 3]]))
    geo = FixedMeshGeometry(quad)
    assert not geo.unwrapped
    assert torch.allclose(geo.mesh().v_tng, torch.tensor([1.0, 0, 0]).expand(4, 3))
    lo, hi = geo.aabb
    assert bool((hi > lo).all())
