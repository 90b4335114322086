"""Tet grid, marching tets and DMTetGeometry (CPU)."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset.cameras import CameraOptions, validation_cameras
from geometry.base import EmptyMeshError
from geometry.dmtet import DMTetGeometry, sealed_air, sealed_air_loss
from geometry.hashgrid import HashGridOptions
from geometry.marching_tets import (CapacityPlanner, MarchingBackendError, PaddedSurface, SurfaceCapacity, classify,
                                    marching_tets, marching_tets_padded, sdf_sign_change_loss)
from geometry.tet_grid import TET_CACHE_DIR, TetGridError, tet_edges, tet_grid, tet_topology
from render import raster
from render.normal_render import render_normal_mask

SMALL_GRID = HashGridOptions(log2_hashmap_size=12)  # keeps CPU tests fast; defaults tested elsewhere


def _signed_tet_volumes(verts: np.ndarray, tets: np.ndarray) -> np.ndarray:
    p = verts[tets].astype(np.float64)  # [T, 4, 3]
    return np.linalg.det(p[:, 1:] - p[:, :1]) / 6.0


def test_tet_grid_64_counts_orientation_and_conformity(tmp_path: Path) -> None:
    verts, tets = tet_grid(64, cache_dir=tmp_path)
    assert verts.dtype == np.float32 and tets.dtype == np.int64
    assert verts.shape == (33 ** 3, 3) and tets.shape == (6 * 32 ** 3, 4)  # ~36k vertices
    assert verts.min() == -0.5 and verts.max() == 0.5
    vol = _signed_tet_volumes(verts, tets)
    assert (vol > 0).all(), "every tet must be positively oriented"
    assert np.isclose(vol.sum(), 1.0), "tets must tile the unit box exactly"

    faces = np.sort(tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3), axis=1)
    uniq, counts = np.unique(faces, axis=0, return_counts=True)
    assert set(np.unique(counts)) == {1, 2}
    # A face lies on the box boundary iff its 3 vertices share one coordinate equal to +-0.5.
    fv = verts[uniq]  # [Fu, 3, 3]
    on_boundary = np.any((fv[:, 0] == fv[:, 1]) & (fv[:, 0] == fv[:, 2]) & (np.abs(fv[:, 0]) == 0.5),
                         axis=1)
    assert np.array_equal(counts == 1, on_boundary), "once-used faces = boundary faces"
    assert (counts == 1).sum() == 6 * 2 * 32 ** 2, "each boundary square splits into 2 faces"


def test_tet_grid_128_is_fast_and_cached(tmp_path: Path) -> None:
    start = time.perf_counter()
    verts, tets = tet_grid(128, cache_dir=tmp_path)
    assert time.perf_counter() - start < 10.0
    assert verts.shape == (65 ** 3, 3) and tets.shape == (6 * 64 ** 3, 4)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npz"  # no temp files left behind
    verts2, tets2 = tet_grid(128, cache_dir=tmp_path)
    assert np.array_equal(verts, verts2) and np.array_equal(tets, tets2) and tets2.dtype == np.int64


def test_tet_cache_dir_is_package_relative() -> None:
    assert TET_CACHE_DIR == Path(__file__).resolve().parent.parent / "data" / "tets"


@pytest.mark.parametrize("res", [0, 3, -2, 64.0, True])
def test_tet_grid_rejects_bad_res(res) -> None:
    with pytest.raises(TetGridError, match="res"):
        tet_grid(res)


def _sphere_mesh(radius: float = 0.3, res: int = 64) -> tuple[np.ndarray, np.ndarray]:
    verts, tets = tet_grid(res)
    v = torch.from_numpy(verts)
    sdf = v.norm(dim=1) - radius
    out_v, faces = marching_tets(v, sdf, torch.from_numpy(tets))
    return out_v.numpy().astype(np.float64), faces.numpy()


def test_sphere_is_watertight_outward_and_accurate() -> None:
    radius = 0.3
    verts, faces = _sphere_mesh(radius)
    assert faces.shape[0] > 1000 and faces.dtype == np.int64
    directed = Counter(map(tuple, faces[:, [[0, 1], [1, 2], [2, 0]]].reshape(-1, 2).tolist()))
    undirected = Counter(tuple(sorted(e)) for e in directed.elements())
    assert set(undirected.values()) == {2}, "each edge must be in exactly two faces"
    assert set(directed.values()) == {1}, "neighbouring faces must be consistently oriented"
    assert len(np.unique(faces)) == len(verts), "no unreferenced or duplicated vertices"

    tri = verts[faces]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    signed_volume = np.einsum("ij,ij->i", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])).sum() / 6
    assert signed_volume > 0
    assert abs(signed_volume - 4 / 3 * np.pi * radius ** 3) < 0.02 * 4 / 3 * np.pi * radius ** 3
    assert (np.einsum("ij,ij->i", normals, tri.mean(1)) > 0).all(), "normals must point outward"
    radii = np.linalg.norm(verts, axis=1)
    assert np.abs(radii / radius - 1).max() < 0.01


def test_marching_tets_gradient_matches_finite_differences() -> None:
    verts, tets = tet_grid(6)
    v = torch.from_numpy(verts).double()
    gen = torch.Generator().manual_seed(0)
    sdf = v.norm(dim=1) - 0.3 + 0.05 * torch.rand(v.shape[0], generator=gen, dtype=torch.float64)
    sdf = torch.where(sdf.abs() < 1e-3, sdf + 2e-3, sdf)  # keep signs fixed under the FD step
    tets_t = torch.from_numpy(tets)
    assert marching_tets(v, sdf, tets_t)[1].shape[0] > 0

    def by_sdf(s: torch.Tensor) -> torch.Tensor:
        return marching_tets(v, s, tets_t)[0]

    def by_verts(p: torch.Tensor) -> torch.Tensor:
        return marching_tets(p, sdf, tets_t)[0]

    assert torch.autograd.gradcheck(by_sdf, (sdf.clone().requires_grad_(),), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(by_verts, (v.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_marching_tets_without_crossing_returns_empty() -> None:
    verts, tets = tet_grid(8)
    v = torch.from_numpy(verts)
    out_v, faces = marching_tets(v, torch.ones(v.shape[0]), torch.from_numpy(tets))
    assert out_v.shape == (0, 3) and faces.shape == (0, 3)


def test_marching_tets_rejects_nan_sdf() -> None:
    verts, tets = tet_grid(4)
    sdf = torch.zeros(verts.shape[0])
    sdf[3] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        marching_tets(torch.from_numpy(verts), sdf, torch.from_numpy(tets))


def _force_constant_sdf(geo: DMTetGeometry, value: float) -> None:
    last = geo.sdf_net.mlp[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = value


@pytest.mark.parametrize("value, state", [(1.0, "outside"), (-1.0, "inside")])
def test_empty_mesh_raises_clear_error(value: float, state: str) -> None:
    geo = DMTetGeometry(16, 2.0, SMALL_GRID, backend="torch")
    _force_constant_sdf(geo, value)
    with pytest.raises(EmptyMeshError, match="no triangles") as err:
        geo.extract()
    msg = str(err.value)
    for hint in ("guidance_weight", "sdf_init_shape_scale", "translation_y", "mesh_scale", "sdf_init_iter > 0", state):
        assert hint in msg


def test_dmtet_geometry_deformation_and_backend() -> None:
    geo = DMTetGeometry(16, 2.0, SMALL_GRID, backend="torch")
    assert geo.sdf_net.backend == "torch"
    assert torch.allclose(geo.aabb, torch.tensor([[-1.0] * 3, [1.0] * 3]))
    deform = torch.full_like(geo.grid_verts, 100.0)
    moved = geo.deformed_verts(deform) - geo.grid_verts
    assert torch.allclose(moved, torch.full_like(moved, 1 / 16), atol=1e-6)  # |offset| <= 1/grid_res


def test_sdf_sign_change_loss() -> None:
    edges = torch.tensor([[0, 1], [1, 2]])
    assert sdf_sign_change_loss(torch.tensor([1.0, 2.0, 3.0]), edges).item() == 0.0
    sdf = torch.tensor([-1.0, 2.0, 3.0], requires_grad=True)
    loss = sdf_sign_change_loss(sdf, edges)
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    expected = bce(torch.tensor(-1.0), torch.tensor(1.0)) + bce(torch.tensor(2.0), torch.tensor(0.0))
    assert torch.isclose(loss, expected)
    loss.backward()
    assert sdf.grad[0] < 0 and sdf.grad[1] > 0 and sdf.grad[2] == 0  # pulls both towards zero


@pytest.mark.slow
def test_sdf_regularizer_removes_a_hidden_bubble_and_keeps_the_seen_surface() -> None:
    """A solid sphere with a bubble inside: the bubble's surface is never seen, so the image loss
    leaves it there; the sign-change regularizer fills it, while the image loss keeps the sphere.
    A free SDF per grid vertex (no network) so the test shows the loss itself."""
    v, t = tet_grid(24)
    v, t = torch.from_numpy(v).float() * 2.0, torch.from_numpy(t)
    topo = tet_topology(t)
    sphere = v.norm(dim=1) - 0.75
    bubble_center = torch.tensor([0.15, 0.1, 0.0])
    with_bubble = torch.maximum(sphere, 0.3 - (v - bubble_center).norm(dim=1))   # > 0 inside the bubble
    in_bubble = (v - bubble_center).norm(dim=1) < 0.25
    ctx = raster.make_context("cpu", "torch")
    cams = validation_cameras(CameraOptions(resolution=(64, 64)), "cpu", n=6, elevation_deg=20.0)
    capacity = SurfaceCapacity(20_000, 5_000, 20_000)

    def render(sdf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        surf = marching_tets_padded(v, sdf, t, topo, capacity)
        return render_normal_mask(ctx, surf.verts, surf.faces, cams.mvp, cams.campos, cams.resolution), surf

    with torch.no_grad():
        target = render(sphere)[0]
    for weight in (0.0, 0.01):
        sdf = with_bubble.clone().requires_grad_(True)
        opt = torch.optim.Adam([sdf], lr=0.01)
        # The rate decays to 0: at a constant rate, Adam's momentum keeps carrying a filled vertex back
        # across zero after its sign change is gone, so a 0/1 count at a fixed step would be a coin flip.
        decay = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=60)
        for _ in range(60):
            img, surf = render(sdf)
            loss = ((img - target) ** 2).mean() + weight * surf.sign_change_loss()
            opt.zero_grad()
            loss.backward()
            opt.step()
            decay.step()
        sdf = sdf.detach()
        bubble_left = int((sdf[in_bubble] > 0).sum())
        if weight == 0:
            assert bubble_left == int(in_bubble.sum()) > 10    # unseen: the images cannot remove it
        else:
            assert bubble_left == 0
            vertex_iou = float(((sdf < 0) & (sphere < 0)).sum() / ((sdf < 0) | (sphere < 0)).sum())
            assert vertex_iou > 0.9 and float(((img.detach() - target) ** 2).mean()) < 2e-3   # the sphere stays


def test_tet_edges_unique_sorted() -> None:
    _, tets = tet_grid(4)
    edges = tet_edges(torch.from_numpy(tets))
    assert (edges[:, 0] < edges[:, 1]).all()
    assert len({tuple(e) for e in edges.tolist()}) == edges.shape[0]
    # Euler for a tetrahedralized ball: V - E + F - T = 1
    faces = np.unique(np.sort(tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3),
                              axis=1), axis=0)
    assert 27 - edges.shape[0] + faces.shape[0] - tets.shape[0] == 1


def test_dmtet_mesh_returns_render_mesh() -> None:
    mesh_mod = pytest.importorskip("render.mesh")
    geo = DMTetGeometry(16, 2.0, SMALL_GRID, backend="torch")
    sdf_target = geo.grid_verts.norm(dim=1) - 0.5
    geo.sdf_and_deform = lambda: (sdf_target, torch.zeros_like(geo.grid_verts))  # type: ignore
    mesh = geo.mesh()
    assert isinstance(mesh, mesh_mod.Mesh)
    assert mesh.v_pos.shape[1] == 3 and mesh.t_pos_idx.dtype == torch.int64
    assert mesh.v_nrm is not None


# ------------------------------------------------------------------------------------------------
# Precomputed-topology marching tets (one host sync, no sort) against the reference path
# ------------------------------------------------------------------------------------------------

def test_tet_topology_matches_tet_edges_and_tets() -> None:
    _, tets = tet_grid(8)
    t = torch.from_numpy(tets)
    topo = tet_topology(t)
    assert torch.equal(topo.edges, tet_edges(t))
    assert topo.tet_edges.shape == (t.shape[0], 6) and topo.tet_edges.dtype == torch.int32
    ends = topo.edges[topo.tet_edges.long()]                                   # [T, 6, 2]
    local = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
    expected = torch.sort(t[:, local], dim=2).values
    assert torch.equal(ends, expected)


@pytest.mark.parametrize("res,kind", [(6, "sphere"), (16, "noisy"), (32, "random"), (64, "noisy")])
def test_marching_tets_topology_path_identical_to_reference(res: int, kind: str) -> None:
    verts, tets = tet_grid(res)
    v0, t = torch.from_numpy(verts), torch.from_numpy(tets)
    gen = torch.Generator().manual_seed(res)
    sdf0 = v0.norm(dim=1) - 0.3
    if kind == "noisy":
        sdf0 = sdf0 + 0.05 * torch.randn(v0.shape[0], generator=gen)
    elif kind == "random":
        sdf0 = torch.randn(v0.shape[0], generator=gen)
    topo = tet_topology(t)
    for dtype in (torch.float32, torch.float64):
        outs, grads = [], []
        for args in ((), (topo,)):
            v = v0.to(dtype, copy=True).requires_grad_()
            sdf = sdf0.to(dtype, copy=True).requires_grad_()
            out_v, faces = marching_tets(v, sdf, t, *args)
            w = torch.linspace(-1, 1, out_v.numel(), dtype=dtype).reshape(out_v.shape)
            (out_v * w).sum().backward()
            outs.append((out_v.detach(), faces))
            grads.append((v.grad, sdf.grad))
        (rv, rf), (nv, nf) = outs
        assert nf.shape[0] > 0 and nf.dtype == torch.int64
        assert torch.equal(rv, nv) and torch.equal(rf, nf)          # same order, same bits
        if dtype == torch.float64:
            # The same terms, but the two graphs (the topology path carries a pad row) may add a
            # grid vertex's terms (its crossing edges, the 3 broadcast columns of s) in another
            # order, and which order depends on the CPU's vector width: float32 gradients agreed
            # bit for bit on one CI machine and not on another. In float64, reordering K <= 100
            # terms of size <= M changes a sum by at most ~K^2 * 2^-53 * M < 1e-12 * M.
            for ref, topo_grad in zip(*grads):
                scale = ref.abs().max().item()
                torch.testing.assert_close(topo_grad, ref, rtol=0, atol=1e-12 * scale)


def test_marching_tets_topology_path_empty_and_nan() -> None:
    verts, tets = tet_grid(8)
    v, t = torch.from_numpy(verts), torch.from_numpy(tets)
    topo = tet_topology(t)
    for value in (1.0, -1.0):
        out_v, faces = marching_tets(v, torch.full((v.shape[0],), value), t, topo)
        assert out_v.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.int64
    sdf = torch.zeros(v.shape[0])
    sdf[3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        marching_tets(v, sdf, t, topo)
    with pytest.raises(ValueError, match="topology"):
        marching_tets(v, sdf, t[:-1], topo)


def test_marching_tets_topology_gradcheck() -> None:
    verts, tets = tet_grid(6)
    v = torch.from_numpy(verts).double()
    gen = torch.Generator().manual_seed(0)
    sdf = v.norm(dim=1) - 0.3 + 0.05 * torch.rand(v.shape[0], generator=gen, dtype=torch.float64)
    sdf = torch.where(sdf.abs() < 1e-3, sdf + 2e-3, sdf)
    t = torch.from_numpy(tets)
    topo = tet_topology(t)
    assert torch.autograd.gradcheck(lambda s: marching_tets(v, s, t, topo)[0],
                                    (sdf.clone().requires_grad_(),), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda p: marching_tets(p, sdf, t, topo)[0],
                                    (v.clone().requires_grad_(),), eps=1e-6, atol=1e-6)


def test_dmtet_geometry_uses_topology_and_keeps_state_dict() -> None:
    geo = DMTetGeometry(16, 2.0, SMALL_GRID, backend="torch")
    assert not {"tet_edge_ids", "edges", "tets", "grid_verts"} & set(geo.state_dict())   # rebuilt from grid_res
    assert torch.equal(geo.edges, tet_edges(geo.tets))
    sdf_target = geo.grid_verts.norm(dim=1) - 0.5
    geo.sdf_and_deform = lambda: (sdf_target, torch.zeros_like(geo.grid_verts))  # type: ignore
    verts, faces = geo.extract()
    ref_v, ref_f = marching_tets(geo.grid_verts, sdf_target, geo.tets)
    assert torch.equal(verts, ref_v) and torch.equal(faces, ref_f)


def test_checkpoint_state_leaves_the_grid_out_and_older_checkpoints_still_load() -> None:
    """training_state is the network and grid_res, the same size on every grid (at grid 256 the grid
    was 650 of a checkpoint's 800 MB); a state written with the grid in it (earlier versions) loads
    onto a geometry on another grid and gives the same SDF on the saved grid."""
    geo = DMTetGeometry(16, 2.0, SMALL_GRID, backend="torch")
    with torch.no_grad():
        for p in geo.parameters():
            p.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(p.numel()))
    state = geo.training_state()
    geo.set_grid(32)
    finer = geo.training_state()
    assert finer["grid_res"] == 32 and {k: v.shape for k, v in finer["geometry"].items()} == \
        {k: v.shape for k, v in state["geometry"].items()}
    geo.set_grid(16)
    sdf, _ = geo.sdf_and_deform()
    old = dict(state, geometry={**state["geometry"], "grid_verts": geo.grid_verts, "tets": geo.tets,
                                "edges": geo.edges})
    other = DMTetGeometry(32, 2.0, SMALL_GRID, backend="torch")
    other.load_training_state(old)
    assert other.grid_res == 16 and torch.equal(other.tets, geo.tets)
    assert torch.equal(other.sdf_and_deform()[0], sdf)


# ----------------------------------------------------------------------------------------------
# Sync-free marching tets (fixed-size buffers)

def _noisy_sphere(res: int, seed: int = 0):
    verts, tets = tet_grid(res)
    v, t = torch.from_numpy(verts), torch.from_numpy(tets)
    gen = torch.Generator().manual_seed(seed)
    sdf = v.norm(dim=1) - 0.3 + 0.05 * torch.randn(v.shape[0], generator=gen)
    return v, sdf, t, tet_topology(t)


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (nvdiffrast)")])]


@pytest.mark.parametrize("device", DEVICES)
def test_padded_marching_tets_renders_and_differentiates_like_the_exact_one(device: str) -> None:
    """Pad faces are culled and skipped by antialiasing (torch rasterizer on CPU, nvdiffrast on
    CUDA), so the normal image and the gradients reaching the SDF and the vertices are those of the
    exact-size surface."""
    v0, sdf0, t, _ = _noisy_sphere(16)
    v0, sdf0, t = v0.to(device), sdf0.to(device), t.to(device)
    topo = tet_topology(t)
    cams = validation_cameras(CameraOptions(resolution=(64, 64), fovy_range=(45.0, 45.0)), device, n=3)
    ctx = raster.make_context(device, "torch" if device == "cpu" else "nvdiffrast")
    w = torch.rand(3, 64, 64, 4, generator=torch.Generator().manual_seed(1)).to(device)
    exact_v, exact_f = marching_tets(v0, sdf0, t, topo)
    cap = SurfaceCapacity(*(int(n * 1.5) + 7 for n in (exact_f.shape[0], exact_f.shape[0], exact_v.shape[0])))
    images, grads = [], []
    for padded in (False, True):
        v, sdf = v0.clone().requires_grad_(), sdf0.clone().requires_grad_()
        if padded:
            surf = marching_tets_padded(v, sdf, t, topo, cap)
            out_v, faces = surf.verts, surf.faces
            n_two = exact_f.shape[0] - int(surf.counts[1])
            assert surf.counts.tolist() == [0, exact_f.shape[0] - n_two, n_two, exact_v.shape[0]]
            assert out_v.shape == (cap.verts + 1, 3) and faces.shape == (cap.tets + cap.two, 3)
            assert torch.isfinite(out_v).all()
        else:
            out_v, faces = marching_tets(v, sdf, t, topo)
        img = render_normal_mask(ctx, out_v, faces, cams.mvp, cams.campos, cams.resolution)
        (img * w).sum().backward()
        images.append(img.detach())
        grads.append((v.grad, sdf.grad))
    assert images[0][..., 3].sum() > 100                        # the sphere covers many pixels
    # Same triangles in the same relative order: equal up to float summation order in the
    # vertex normals (index_add over a longer face list).
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)
    for exact, padded in zip(grads[0], grads[1]):
        torch.testing.assert_close(padded, exact, rtol=1e-4, atol=1e-5)


def test_padded_marching_tets_overflow_drops_triangles_safely() -> None:
    v, sdf, t, topo = _noisy_sphere(16, seed=3)
    exact_v, exact_f = marching_tets(v, sdf, t, topo)
    surf = marching_tets_padded(v, sdf, t, topo, SurfaceCapacity(100, 10, 150))
    counts = surf.counts.tolist()
    assert PaddedSurface.overflow(counts, SurfaceCapacity(100, 10, 150))
    assert not PaddedSurface.overflow(counts, SurfaceCapacity(*counts[1:]))
    f = surf.faces
    degenerate = (f[:, 0] == f[:, 1]) & (f[:, 1] == f[:, 2])                     # the pad faces
    real = f[~degenerate]
    assert 0 < real.shape[0] <= 110 and torch.isfinite(surf.verts).all()
    assert int(f.max()) < surf.verts.shape[0]
    # Partial faces never appear: a triangle has three distinct vertices or is a pad face.
    assert ((real[:, 0] != real[:, 1]) & (real[:, 1] != real[:, 2]) & (real[:, 0] != real[:, 2])).all()
    # With room to spare, pad faces are spread over the vertices (no index collects many of them).
    roomy = marching_tets_padded(v, sdf, t, topo, SurfaceCapacity(*(3 * n for n in counts[1:])))
    g = roomy.faces
    pads = g[(g[:, 0] == g[:, 1]) & (g[:, 1] == g[:, 2])]
    assert pads.shape[0] >= 2 * counts[1]
    assert int(torch.bincount(pads[:, 0]).max()) <= 2     # one per vertex from each face block
    # Every kept triangle is a triangle of the exact surface (vertex ids are global crossing ids).
    exact = {tuple(f) for f in exact_f.tolist()}
    assert all(tuple(f) in exact for f in real.tolist())
    torch.testing.assert_close(surf.verts[:150], exact_v[:150])


def test_capacity_planner_grows_early_and_shrinks_late() -> None:
    planner = CapacityPlanner()
    planner.update([0, 10_000, 2_000, 6_000])
    assert planner.capacity == SurfaceCapacity(15_360, 3_072, 9_216)       # x1.5, rounded up to 1024
    planner.update([0, 12_000, 2_500, 7_000])                                # within 85%: kept
    assert planner.capacity == SurfaceCapacity(15_360, 3_072, 9_216)
    planner.update([0, 14_000, 2_500, 7_000])                                # tets past 85%: resized
    assert planner.capacity == SurfaceCapacity(21_504, 4_096, 11_264)
    planner.update([0, 8_000, 1_000, 3_500])                                 # not all under 35%: kept
    assert planner.capacity == SurfaceCapacity(21_504, 4_096, 11_264)
    planner.update([0, 7_000, 1_000, 3_000])                                 # all under 35%: shrunk
    assert planner.capacity == SurfaceCapacity(11_264, 2_048, 5_120)


def test_set_grid_samples_the_same_network_on_another_grid() -> None:
    geo = DMTetGeometry(8, 2.0, SMALL_GRID, backend="torch")
    params = list(geo.sdf_net.parameters())
    geo.set_grid(12)
    verts, tets = tet_grid(12)
    assert geo.grid_res == 12 and geo.tets.shape == tets.shape
    assert list(geo.sdf_net.parameters()) == params                       # nothing learned is replaced
    sdf, _ = geo.sdf_and_deform()
    assert torch.equal(sdf, geo.sdf_net(torch.from_numpy(verts) * 2.0)[0])
    topo = tet_topology(geo.tets)                                          # topology buffers rebuilt too
    assert torch.equal(geo.edges, topo.edges) and torch.equal(geo.tet_edge_ids, topo.tet_edges)
    geo.set_grid(8)
    assert geo.tets.shape == tet_grid(8)[1].shape


def test_geometry_check_counts_names_the_problem() -> None:
    geo = DMTetGeometry(8, 2.0, SMALL_GRID, backend="torch")
    with pytest.raises(ValueError, match="3 non-finite values of 125"):
        geo.check_counts([3, 10, 2, 8])
    geo.check_counts([0, 10, 2, 8])                                          # a normal surface: no error
    with pytest.raises(EmptyMeshError, match="no triangles"):
        geo.check_counts([0, 0, 0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_padded_empty_surface_renders_an_empty_image(device: str) -> None:
    """A surface that vanished still renders (the training step learns of it one step late, from
    the counts): only pad faces, so an empty image and zero, finite gradients."""
    v, _, t, _ = _noisy_sphere(8)
    v, t = v.to(device).requires_grad_(), t.to(device)
    sdf = torch.ones(v.shape[0], device=device, requires_grad=True)      # all outside: no surface
    surf = marching_tets_padded(v, sdf, t, tet_topology(t), SurfaceCapacity(16, 16, 16))
    assert surf.counts.tolist() == [0, 0, 0, 0]
    cams = validation_cameras(CameraOptions(resolution=(32, 32)), device, n=2)
    ctx = raster.make_context(device, "torch" if device == "cpu" else "nvdiffrast")
    img = render_normal_mask(ctx, surf.verts, surf.faces, cams.mvp, cams.campos, cams.resolution)
    assert img.abs().max() == 0
    img.sum().backward()
    assert torch.isfinite(sdf.grad).all() and sdf.grad.abs().max() == 0


def test_geometry_extract_padded_matches_marching_tets_on_every_vertex() -> None:
    """DMTetGeometry.extract_padded evaluates the network with gradients only at crossing-edge
    ends; the surface is identical and the parameter gradients equal (to float rounding) those of
    marching_tets_padded on the network's output at every grid vertex."""
    torch.manual_seed(0)
    geo = DMTetGeometry(24, 2.0, SMALL_GRID, backend="torch")
    net = geo.sdf_net.forward
    # A sphere plus the (small, random) network: a closed surface whose SDF and deformation still
    # depend on every parameter, evaluated point by point as the network is.
    geo.sdf_net.forward = lambda x: (lambda s, d: (0.2 * s + x.norm(dim=1) - 0.6, d))(*net(x))  # type: ignore
    planner = CapacityPlanner()
    params = [p for p in geo.parameters() if p.requires_grad]
    outs, grads = [], []
    for lazy in (True, False):
        if lazy:
            surf = geo.extract_padded(planner)
        else:
            sdf, deform = geo.sdf_and_deform()
            surf = marching_tets_padded(geo.deformed_verts(deform), sdf, geo.tets, geo.topology, planner.capacity)
            # The sign-change regularizer of the padded surfaces is the full grid's (float rounding).
            reg_grid = sdf_sign_change_loss(sdf, geo.edges)
        w = torch.linspace(-1, 1, surf.verts.numel()).reshape(surf.verts.shape)
        objective = (surf.verts * w).sum() + surf.sign_change_loss()
        grads.append(torch.autograd.grad(objective, params, allow_unused=True))
        outs.append(surf)
    lazy, full = outs
    assert torch.equal(lazy.verts, full.verts) and torch.equal(lazy.faces, full.faces)
    assert torch.equal(lazy.edge_ok, full.edge_ok) and int(full.edge_ok.sum()) == int(full.counts[3])
    torch.testing.assert_close(lazy.sign_change_loss(), reg_grid, rtol=1e-6, atol=0)
    torch.testing.assert_close(full.sign_change_loss(), reg_grid, rtol=1e-6, atol=0)
    assert lazy.counts[:4].tolist() == full.counts.tolist() and int(full.counts[1]) > 100
    # Distinct crossing-edge ends: between half the edges and all of them, never past the buffer.
    n_ends, n_cross = int(lazy.counts[4]), int(full.counts[3])
    assert n_cross / 2 < n_ends <= min(1.1 * n_cross + 1, planner.capacity.verts + 1)
    for g_lazy, g_full in zip(*grads):
        assert (g_lazy is None) == (g_full is None)
        if g_full is not None:
            torch.testing.assert_close(g_lazy, g_full, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Marching tets' classification: the Triton kernels (geometry/dmtet_triton.py) against the PyTorch
# reference. Integer and comparison ops only, so the outputs must be equal, not close.

def classify_parity(device: str) -> None:
    """Both backends on a grid-32 tet grid with a sphere SDF plus noise, NaN and +-inf entries."""
    verts, tets = tet_grid(32)
    verts_t, tets_t = torch.from_numpy(verts).to(device), torch.from_numpy(tets).to(device)
    gen = torch.Generator().manual_seed(0)
    sdf = (verts_t.norm(dim=1) - 0.3) + 0.02 * torch.randn(verts_t.shape[0], generator=gen).to(device)
    sdf[::97], sdf[5::89], sdf[7::83] = float("nan"), float("inf"), -float("inf")
    sdf[11::79] = 0.0                                                    # exactly zero counts as outside
    topo = tet_topology(tets_t)
    ref, fused = classify(sdf, tets_t, topo, "torch"), classify(sdf, tets_t, topo, "triton")
    for name in ref._fields:
        a, b = getattr(ref, name), getattr(fused, name)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), name
    n_bad, n_act, n_two, n_cross = ref.counts.tolist()
    assert n_bad > 0 and n_act > 1000 and 0 < n_two < n_act and n_cross > n_act / 2    # all cases reached


def test_classify_backend_is_explicit(monkeypatch: pytest.MonkeyPatch) -> None:
    """An unknown backend is refused, and "triton" without triton says why (no silent fallback)."""
    _, tets = tet_grid(4)
    t = torch.from_numpy(tets)
    sdf = torch.linspace(-1, 1, 27)
    with pytest.raises(ValueError, match="'backend' must be one of"):
        classify(sdf, t, tet_topology(t), "cuda")
    monkeypatch.setattr("geometry.marching_tets._TRITON_MISSING", "triton is not importable (test)")
    with pytest.raises(MarchingBackendError, match=r"triton is not importable \(test\)"):
        classify(sdf, t, tet_topology(t), "triton")


def test_classify_triton_matches_reference_in_interpreter() -> None:
    """On CPU through TRITON_INTERPRET=1 (a subprocess: triton picks the mode when kernels are defined)."""
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.test_dmtet import classify_parity; classify_parity('cpu')"
    proc = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- sealed air --------------------------------------------------------------------------------

def _flood_fill_sealed(sdf: np.ndarray, edges: np.ndarray, boundary: np.ndarray) -> np.ndarray:
    """Reference: breadth-first search from the boundary's outside vertices along edges whose ends
    are both outside; every outside vertex it does not reach is sealed."""
    outside = sdf > 0
    neighbours: dict[int, list[int]] = {}
    for a, b in edges:
        if outside[a] and outside[b]:
            neighbours.setdefault(int(a), []).append(int(b))
            neighbours.setdefault(int(b), []).append(int(a))
    seen = set(np.flatnonzero(outside & boundary).tolist())
    frontier = list(seen)
    while frontier:
        frontier = [n for v in frontier for n in neighbours.get(v, []) if n not in seen and not seen.add(n)]
    reached = np.zeros_like(outside)
    reached[list(seen)] = True
    return outside & ~reached if (outside & boundary).any() else np.zeros_like(outside)


def _bubble_sphere_sdf(p: np.ndarray, bubble: float = 0.3) -> np.ndarray:
    """A solid ball of radius 0.8 with a sealed spherical void of radius `bubble` at its centre."""
    r = np.linalg.norm(p, axis=1)
    return np.maximum(r - 0.8, bubble - r)


def test_sealed_air_matches_a_flood_fill_reference() -> None:
    """scipy.ndimage's labels with the Kuhn stencil, in the bounding box of the inside, against a
    search along the grid's actual tet edges over the whole grid."""
    verts, tets = tet_grid(16)
    edges = tet_edges(torch.from_numpy(tets))
    boundary = (np.abs(verts) == 0.5).any(1)                        # on the grid box's faces
    assert boundary.sum() == 9 ** 3 - 7 ** 3                        # the 9^3 lattice's outer shell
    rng = np.random.default_rng(0)
    lattice = np.round((verts + 0.5) * 8).astype(int)                # indices 0..8 per axis
    n_sealed = []
    for draw in range(20):
        # Mostly inside, so that random outside vertices are often cut off from the boundary.
        sdf = np.where(rng.random(len(verts)) < rng.uniform(0.1, 0.4), 1.0, -1.0).astype(np.float32)
        if draw % 2:   # the inside only in a sub-box: the search covers that box alone
            a = rng.integers(1, 4, 3)
            sdf[~((lattice >= a) & (lattice <= a + rng.integers(2, 4, 3))).all(1)] = 1.0
        got = sealed_air(torch.from_numpy(sdf), 16).numpy()
        np.testing.assert_array_equal(got, _flood_fill_sealed(sdf, edges.numpy(), boundary))
        n_sealed.append(int(got.sum()))
    assert max(n_sealed) > 0 and min(n_sealed) < max(n_sealed)     # the draws include sealed pockets
    filled = -np.ones(len(verts), dtype=np.float32)
    filled[len(verts) // 2] = 1.0                                   # one outside vertex, no outside boundary
    assert not sealed_air(torch.from_numpy(filled), 16).any()
    with pytest.raises(ValueError, match=r"expected sdf_v \[729\] \(the dmtet_grid=16 lattice, 9\^3 vertices\)"):
        sealed_air(torch.from_numpy(filled)[:, None], 16)


def test_sealed_air_finds_a_void_and_not_an_open_cavity() -> None:
    p = tet_grid(32)[0] * 2.1
    void = sealed_air(torch.from_numpy(_bubble_sphere_sdf(p)), 32).numpy()
    r = np.linalg.norm(p, axis=1)
    np.testing.assert_array_equal(void, r < 0.3)                    # exactly the void's vertices
    # The same ball with a shaft from the void up through the top: the void is open air now.
    shaft = np.maximum(np.hypot(p[:, 0], p[:, 2]) - 0.15, -p[:, 1])   # < 0 in a vertical shaft above the centre
    cavity = np.where(shaft < 0, -shaft, _bubble_sphere_sdf(p))
    assert (cavity > 0).sum() > (r > 0.8).sum() + (r < 0.3).sum()   # the shaft is air
    assert not sealed_air(torch.from_numpy(cavity.astype(np.float32)), 32).any()


@pytest.mark.slow
def test_sealed_air_term_fills_a_void_and_keeps_the_outer_surface() -> None:
    """The loss the trainer adds (sealed_air > 0), beside a term that holds the outer surface where
    it is (as the guidance does where views see it): the void goes within a few refreshes and the
    outside stays."""
    torch.manual_seed(0)
    geo = DMTetGeometry(32, 2.1, encoder_opts=SMALL_GRID)
    points = geo.grid_verts
    target = torch.from_numpy(_bubble_sphere_sdf(points.numpy(), bubble=0.35)).float()
    opt = torch.optim.Adam(geo.sdf_net.parameters(), lr=1e-2)
    for _ in range(300):                                            # fit the voided ball
        opt.zero_grad()
        ((geo.sdf_and_deform()[0] - target) ** 2).mean().backward()
        opt.step()
    rows = geo.sealed_air_rows()
    assert rows.numel() > 50                                        # the fitted network has the void
    r = torch.linalg.norm(points, dim=1)
    seen = (r > 0.65) & (r < 0.95)                                  # a band around the outer surface
    before = geo.sdf_and_deform()[0].detach() > 0
    fitted = {k: v.clone() for k, v in geo.state_dict().items()}

    def train(weight: float) -> int | None:
        """300 steps at the geometry phase's rate; the step the void was gone at (None: never)."""
        geo.load_state_dict(fitted)
        opt, gone = torch.optim.Adam(geo.sdf_net.parameters(), lr=1e-3), None
        for step in range(300):
            if step % 10 == 0:                                      # the trainer's refresh interval
                rows = geo.sealed_air_rows()
                gone = step if gone is None and rows.numel() == 0 else gone
            opt.zero_grad()
            loss = ((geo.sdf_net(points[seen])[0] - target[seen]) ** 2).mean()
            if weight and rows.numel():
                loss = loss + weight * sealed_air_loss(geo.sdf_net(points[rows])[0], 2.1 / 16)
            loss.backward()
            opt.step()
        return gone
    assert train(0.0) is None                                       # holding the surface alone keeps it
    gone = train(1.0)
    assert gone is not None and gone <= 100, f"the void was gone at step {gone}"
    after = geo.sdf_and_deform()[0].detach() > 0
    assert geo.sealed_air_rows().numel() == 0
    assert (before != after)[r > 0.5].sum() == 0                    # the outside surface is where it was
    assert not after[r < 0.3].any()                                 # where the void was is solid
