"""render/silhouette.py: the walk finds the silhouette edges nvdiffrast's antialias ("pixel") misses
where triangles are small, equals it where the foreground triangle owns the edge, and its Triton
kernel records the same edges as the PyTorch reference."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from config import load_config
from dataset.cameras import CameraOptions, validation_cameras
from guidance.base import IMAGE, StageInput
from phases.geometry import NormalStageRenderer
from render import raster, raster_torch, silhouette
from render.cuda_graph import GraphedFunction
from render.normal_render import normal_to_display, render_normal_mask
from render.raster import RasterInputError
from render.silhouette import SilhouetteBackendError, SilhouetteInputError, SilhouetteTopology
from scripts.dev.silhouette_check import dmtet_surface, fd_ratio, icosphere, perspective_mvp

CTX = raster.make_context("cpu")
REPO = Path(__file__).resolve().parents[1]


def _render(verts: torch.Tensor, tri: torch.Tensor, mvp: torch.Tensor, res: tuple[int, int] | int,
            ctx: raster.RasterContext = CTX) -> tuple[torch.Tensor, torch.Tensor]:
    """(pos [B, V, 4], rast [B, H, W, 4]) of verts [V, 3] under mvp [B, 4, 4]."""
    res = (res, res) if isinstance(res, int) else res
    pos = raster.clip_positions(verts, mvp)
    rast, _ = raster.rasterize(ctx, pos.detach(), tri, res, grad_db=False)
    return pos, rast


# ------------------------------------------------------------------------------------------------
# The silhouette gradient: autograd against finite differences (scripts/dev/silhouette_check.py;
# its FD_PIXELS comment says why the step moves the silhouette by 2 pixels)


@pytest.mark.parametrize("subdivisions,pixel_below", [(1, 0.60), (3, 0.40), (5, 0.05)])   # 80 / 1,280 / 20,480 faces
def test_walk_keeps_the_silhouette_gradient_of_icospheres(subdivisions: int, pixel_below: float) -> None:
    verts, tri = icosphere(subdivisions)
    mvp = perspective_mvp(3.0, 45.0)[None]
    walk = fd_ratio(CTX, verts, tri, mvp, 256, "walk")
    pixel = fd_ratio(CTX, verts, tri, mvp, 256, "pixel")
    assert 0.90 <= walk["ratio"] <= 1.10, walk
    # nvdiffrast's method loses more of it the smaller the triangles (measured 0.54 / 0.34 / 0.006).
    assert pixel["ratio"] < pixel_below, pixel


@pytest.mark.parametrize("grid,pixel_below", [(64, 0.60), (128, 0.25), pytest.param(256, 0.15, marks=pytest.mark.slow)])
def test_walk_keeps_the_silhouette_gradient_of_dmtet_surfaces(grid: int, pixel_below: float) -> None:
    """Marching tets of a closed mesh's SDF (mesh_scale 2.3) at 512^2: ~6k / 26k / 100k faces."""
    verts, tri = dmtet_surface(grid)
    mvp = perspective_mvp(3.0, 35.0)[None]
    walk = fd_ratio(CTX, verts, tri, mvp, 512, "walk")
    pixel = fd_ratio(CTX, verts, tri, mvp, 512, "pixel")
    assert 0.90 <= walk["ratio"] <= 1.10, walk
    assert pixel["ratio"] < pixel_below, pixel            # measured 0.50 / 0.19 / 0.12


def _subdivided_triangle(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Barycentric weights [V, 3] of the vertices of a triangle cut into n^2 similar triangles,
    and the faces [n^2, 3] int32, wound like the corners (0, 1, 2)."""
    index, weights = {}, []
    for i in range(n + 1):
        for j in range(n + 1 - i):
            index[i, j] = len(weights)
            weights.append([(n - i - j) / n, i / n, j / n])
    faces = []
    for i in range(n):
        for j in range(n - i):
            faces.append([index[i, j], index[i + 1, j], index[i, j + 1]])
            if i + j < n - 1:
                faces.append([index[i + 1, j], index[i + 1, j + 1], index[i, j + 1]])
    return torch.tensor(weights), torch.tensor(faces, dtype=torch.int32)


def _weighted_coverage(corners: torch.Tensor, bary: torch.Tensor, tri: torch.Tensor, res: int, method: str
                       ) -> torch.Tensor:
    """Sum of the antialiased mask of the triangle with clip-space `corners` [3, 4], as the mesh
    (bary [V, 3], tri), under a ramp of weights so that each corner's gradient differs."""
    pos = (bary @ corners)[None].contiguous()
    rast, _ = raster.rasterize(CTX, pos.detach(), tri, (res, res), grad_db=False)
    mask = (rast[..., 3:] > 0).float()
    ramp = torch.linspace(1.0, 2.0, res)
    weights = (ramp[None, :, None] + 0.5 * ramp[None, None, :])[..., None]
    return (raster.antialias(mask, rast, pos, tri, backend=CTX, method=method) * weights).sum()


def test_vertex_gradient_matches_finite_differences_for_large_and_tiny_triangles() -> None:
    """A large triangle: each corner coordinate's gradient against a central difference over +-1
    pixel. The same triangle cut into 0.4-pixel triangles: the walk gives the same corner gradient
    (the silhouette is the same), nvdiffrast's method almost none of it."""
    res = 64
    corners = torch.tensor([[-0.8, -0.7, 0.0, 1.0], [0.75, -0.5, 0.2, 1.0], [-0.1, 0.8, 0.1, 1.0]])
    one, one_tri = torch.eye(3), torch.tensor([[0, 1, 2]], dtype=torch.int32)
    fine, fine_tri = _subdivided_triangle(128)
    grads = {}
    for name, (bary, tri, method) in {"large": (one, one_tri, "walk"), "tiny": (fine, fine_tri, "walk"),
                                      "tiny_pixel": (fine, fine_tri, "pixel")}.items():
        c = corners.clone().requires_grad_(True)
        (grads[name],) = torch.autograd.grad(_weighted_coverage(c, bary, tri, res, method), c)
    step = 2.0 / res                                                        # one pixel in clip space (w = 1)
    for v in range(3):
        for axis in range(2):
            delta = torch.zeros_like(corners)
            delta[v, axis] = step
            with torch.no_grad():
                fd = float(_weighted_coverage(corners + delta, one, one_tri, res, "walk")
                           - _weighted_coverage(corners - delta, one, one_tri, res, "walk")) / (2 * step)
            assert float(grads["large"][v, axis]) == pytest.approx(fd, rel=0.03), (v, axis)
    xy = (slice(None), slice(0, 2))
    torch.testing.assert_close(grads["tiny"][xy], grads["large"][xy], rtol=1e-3, atol=1e-3 * grads["large"].abs().max())
    assert float(grads["tiny_pixel"][xy].abs().sum()) < 0.2 * float(grads["large"][xy].abs().sum())


# ------------------------------------------------------------------------------------------------
# The walk is nvdiffrast's antialias wherever the foreground triangle owns the silhouette edge


def _two_views() -> torch.Tensor:
    return torch.stack([perspective_mvp(3.0, 45.0), perspective_mvp(2.6, 40.0, azimuth_deg=35.0)])


def _values_and_grads(method: str, pos: torch.Tensor, rast: torch.Tensor, tri: torch.Tensor,
                      color: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    p, c = pos.detach().clone().requires_grad_(True), color.clone().requires_grad_(True)
    out = raster.antialias(c, rast, p, tri, backend=CTX, method=method)
    return (out.detach(), *torch.autograd.grad((out * weights).sum(), (p, c)))


def _assert_same(walk: tuple[torch.Tensor, ...], pixel: tuple[torch.Tensor, ...]) -> None:
    # The same float ops in the same order: equal values and colour gradients. Vertex gradients sum
    # per-pair contributions in autograd's scatter order (a different graph), so up to rounding.
    assert torch.equal(walk[0], pixel[0])
    torch.testing.assert_close(walk[1], pixel[1], rtol=1e-5, atol=1e-6 * float(pixel[1].abs().max()))
    assert torch.equal(walk[2], pixel[2])


def test_walk_equals_pixel_method_on_large_triangles() -> None:
    """Three large overlapping triangles at different depths (one leaving the image), coloured:
    every silhouette edge belongs to the triangle under the pixel, so the two methods agree. (Two
    triangles of a quad would not do: near a corner the segment may cross the diagonal first, and
    the walk then finds the edge the pixel method misses.)"""
    verts = torch.tensor([[-0.9, -0.6, 0.0], [0.5, -0.7, 0.0], [0.6, 0.5, 0.0],
                          [-0.2, -0.2, 0.5], [1.8, -0.3, 0.4], [1.7, 0.9, 0.6],
                          [-0.7, 0.1, -0.3], [0.3, -0.9, 0.3], [0.2, 0.8, -0.2]])
    tri = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]], dtype=torch.int32)
    pos, rast = _render(verts, tri, _two_views(), (48, 64))
    gen = torch.Generator().manual_seed(0)
    color = torch.rand(2, 48, 64, 3, generator=gen) * (rast[..., 3:] > 0)
    weights = torch.rand(2, 48, 64, 3, generator=gen)
    walk = _values_and_grads("walk", pos, rast, tri, color, weights)
    pixel = _values_and_grads("pixel", pos, rast, tri, color, weights)
    assert int((walk[0] != color).any(-1).sum()) > 100                      # silhouettes were blended
    _assert_same(walk, pixel)


@pytest.mark.parametrize("range_mode", [False, True])
def test_one_step_walk_is_the_pixel_method(range_mode: bool) -> None:
    """With max_steps=1 the walk tests the foreground triangle only: nvdiffrast's antialias, on a
    mesh whose silhouette pairs mostly need more steps."""
    verts, tri = icosphere(3)
    mvp = _two_views()
    if range_mode:                                  # pos [V, 4], each image's triangles by (start, count)
        pos_b = raster.clip_positions(verts, mvp)
        pos = pos_b.reshape(-1, 4).contiguous()
        v, f = verts.shape[0], tri.shape[0]
        tri = torch.cat([tri, tri + v]).to(torch.int32)
        ranges = torch.tensor([[0, f], [f, f]], dtype=torch.int32)
        rast, _ = raster.rasterize(CTX, pos.detach(), tri, (64, 64), ranges=ranges, grad_db=False)
    else:
        pos, rast = _render(verts, tri, mvp, 64)
    gen = torch.Generator().manual_seed(1)
    color = torch.rand(2, 64, 64, 2, generator=gen)
    weights = torch.rand(2, 64, 64, 2, generator=gen)
    topology = silhouette.silhouette_topology(tri, pos.shape[-2])
    results = {}
    for steps in (1, silhouette.MAX_STEPS):
        edges = silhouette.find_silhouette_edges(rast, pos.detach(), tri, topology, kernel="torch", max_steps=steps)
        p, c = pos.detach().clone().requires_grad_(True), color.clone().requires_grad_(True)
        out = silhouette.blend_silhouettes(c, rast, p, edges)
        results[steps] = (edges, out.detach(), *torch.autograd.grad((out * weights).sum(), (p, c)))
    p, c = pos.detach().clone().requires_grad_(True), color.clone().requires_grad_(True)
    out = raster_torch.antialias(c, rast, p, tri)
    pixel = (out.detach(), *torch.autograd.grad((out * weights).sum(), (p, c)))
    _assert_same(results[1][1:], pixel)
    # The full walk finds more edges, and keeps every one-step edge.
    one, full = results[1][0], results[silhouette.MAX_STEPS][0]
    found = one[..., 0] >= 0
    assert torch.equal(one[found], full[found])
    assert int((full[..., 0] >= 0).sum()) > 1.5 * int(found.sum())


# ------------------------------------------------------------------------------------------------
# Implementation paths: fixed-size against compacted, Triton against PyTorch, the topology table


def test_fixed_size_walk_and_blend_equal_the_compacted_ones() -> None:
    """The CUDA-graph-safe fixed-size path (masks over all pairs) against the CPU's compaction."""
    verts, tri = icosphere(3)
    pos, rast = _render(verts, tri, _two_views(), (40, 56))
    topology = silhouette.silhouette_topology(tri, verts.shape[0])
    fixed = silhouette._walk_torch(rast, pos.detach(), tri, topology, silhouette.MAX_STEPS, compact=False)
    compact = silhouette._walk_torch(rast, pos.detach(), tri, topology, silhouette.MAX_STEPS, compact=True)
    assert torch.equal(fixed, compact) and int((fixed[..., 0] >= 0).sum()) > 50
    color = torch.rand(2, 40, 56, 3, generator=torch.Generator().manual_seed(2))
    outs = []
    for lanes in (None, torch.nonzero(fixed[..., 0].reshape(-1) >= 0).squeeze(1)):
        p, c = pos.detach().clone().requires_grad_(True), color.clone().requires_grad_(True)
        out = silhouette._blend(c, rast, p, fixed, lanes)
        outs.append((out.detach(), *torch.autograd.grad((out * color).sum(), (p, c))))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def triton_parity() -> None:
    """The Triton walk (under TRITON_INTERPRET=1 on the CPU) records the reference's edges: batch 2
    with triangles of a few pixels to a fraction of one, a truncated walk, range mode."""
    assert silhouette.walk_kernel("triton", torch.device("cpu")) == "triton"
    verts, tri = icosphere(3)
    # Degenerate padding faces (q, q, q), as marching_tets_padded emits: never walked into.
    tri = torch.cat([tri, torch.arange(6, dtype=torch.int32)[:, None].expand(6, 3)]).contiguous()
    pos, rast = _render(verts, tri, _two_views(), (24, 40))
    pos_r = pos[1].contiguous()                                             # range mode: pos [V, 4]
    ranges = torch.tensor([[0, tri.shape[0]]], dtype=torch.int32)
    rast_r, _ = raster.rasterize(CTX, pos_r, tri, (24, 40), ranges=ranges, grad_db=False)
    topology = silhouette.silhouette_topology(tri, verts.shape[0])
    found = {}
    for name, p, r, steps in [("full", pos, rast, silhouette.MAX_STEPS), ("short", pos, rast, 2),
                              ("range", pos_r, rast_r, silhouette.MAX_STEPS)]:
        ref = silhouette.find_silhouette_edges(r, p, tri, topology, kernel="torch", max_steps=steps)
        got = silhouette.find_silhouette_edges(r, p, tri, topology, kernel="triton", max_steps=steps)
        assert got.dtype == ref.dtype and torch.equal(got, ref), (name, int((got != ref).any(-1).sum()))
        found[name] = int((ref[..., 0] >= 0).sum())
    # Walks of several steps were compared: the truncated walk finds fewer edges than the full one.
    assert 10 < found["short"] < found["full"] and found["range"] > 10, found


@pytest.mark.slow   # a subprocess with the Triton interpreter: ~11 s on 2 cores
def test_triton_walk_matches_reference_in_interpreter() -> None:
    """On the CPU through TRITON_INTERPRET=1 (a subprocess: triton picks the mode when kernels are defined)."""
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.test_silhouette import triton_parity; triton_parity()"
    proc = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", "-c", code], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_topology_neighbours_agree_with_the_opposite_vertex_table() -> None:
    """Closed sphere plus a third face on one of its edges (non-manifold), a duplicate of one of
    its faces, a degenerate face and a loose triangle: the neighbour's opposite vertex is
    raster_torch.opposite_vertices' (nvdiffrast's first-two-faces rule)."""
    verts, tri = icosphere(1)
    v, f = verts.shape[0], tri.shape[0]
    fin = [int(tri[0, 1]), int(tri[0, 2]), v]
    tri = torch.cat([tri, torch.tensor([fin, tri[5].tolist(), [3, 3, 3], [v + 1, v + 2, v + 3]], dtype=torch.int32)])
    topo = silhouette.silhouette_topology(tri, v + 4)
    nb, ne = topo.neighbour_fx3.long(), topo.neighbour_edge_fx3.long()
    assert topo.neighbour_fx3.dtype == topo.neighbour_edge_fx3.dtype == torch.int32 and nb.shape == tri.shape
    t = tri.long()
    opp = torch.where(nb >= 0, t[nb.clamp(min=0), ne.clamp(min=0)], -1)
    assert torch.equal(opp, raster_torch.opposite_vertices(tri, v + 4))
    # The sphere's faces see each other across every edge (the first two faces of each edge).
    back = nb[nb[:f].clamp(min=0), ne[:f].clamp(min=0)]
    assert bool((nb[:f] >= 0).all()) and torch.equal(back, torch.arange(f)[:, None].expand(f, 3))
    assert bool((nb[f] == -1).all())                           # the third face on an edge: none
    assert torch.equal(nb[f + 1], nb[5])                       # the duplicate sees face 5's neighbours
    assert bool((nb[f + 2:] == -1).all())                      # degenerate and loose faces


# ------------------------------------------------------------------------------------------------
# Choices and errors


def test_walk_kernel_is_chosen_explicitly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert silhouette.walk_kernel("auto", torch.device("cpu")) == "torch"
    assert silhouette.walk_kernel("torch", torch.device("cuda")) == "torch"
    with pytest.raises(SilhouetteInputError, match=r"kernel: expected one of .*, got 'cuda'"):
        silhouette.walk_kernel("cuda", torch.device("cpu"))
    monkeypatch.setattr(silhouette, "_TRITON_MISSING", None)
    assert silhouette.walk_kernel("auto", torch.device("cuda")) == "triton"
    with pytest.raises(SilhouetteBackendError, match=r"needs CUDA tensors .*got device cpu"):
        silhouette.walk_kernel("triton", torch.device("cpu"))
    monkeypatch.setattr(silhouette, "_TRITON_MISSING", "triton is not importable (test)")
    assert silhouette.walk_kernel("auto", torch.device("cuda")) == "torch"
    with pytest.raises(SilhouetteBackendError, match=r"triton is not importable \(test\)"):
        silhouette.walk_kernel("triton", torch.device("cuda"))


def test_inputs_are_validated_with_argument_expected_and_got() -> None:
    verts, tri = icosphere(1)
    pos, rast = _render(verts, tri, _two_views(), 16)
    topo = silhouette.silhouette_topology(tri, verts.shape[0])
    find = silhouette.find_silhouette_edges
    with pytest.raises(SilhouetteInputError, match=r"tri_fx3: expected dtype torch.int32, got torch.int64"):
        find(rast, pos, tri.long(), topo)
    with pytest.raises(SilhouetteInputError, match=r"rast_bxhxwx4: expected shape \[B, H, W, 4\], got \(2, 16, 16\)"):
        find(rast[..., 0], pos, tri, topo)
    with pytest.raises(SilhouetteInputError, match=r"pos: expected \[B=2, V, 4\] or \[V, 4\].*got \(1, 42, 4\)"):
        find(rast, pos[:1], tri, topo)
    with pytest.raises(SilhouetteInputError, match=r"topology: expected a SilhouetteTopology .*got Tensor"):
        find(rast, pos, tri, raster_torch.opposite_vertices(tri, verts.shape[0]))
    with pytest.raises(SilhouetteInputError, match=r"topology.neighbour_fx3: expected shape \(80, 3\).*got \(79, 3\)"):
        find(rast, pos, tri, SilhouetteTopology(topo.neighbour_fx3[1:], topo.neighbour_edge_fx3))
    with pytest.raises(SilhouetteInputError, match=r"max_steps: expected an int >= 1, got 0"):
        find(rast, pos, tri, topo, max_steps=0)
    edges = find(rast, pos, tri, topo)
    color = torch.zeros(2, 16, 16, 3)
    with pytest.raises(SilhouetteInputError, match=r"edges_2xbxhxwx2: expected shape \(2, 2, 16, 16, 2\).*"
                                                   r"got \(2, 1, 16, 16, 2\)"):
        silhouette.blend_silhouettes(color, rast, pos, edges[:, :1])
    with pytest.raises(SilhouetteInputError, match=r"color_bxhxwxc: expected \[B, H, W, C\] with \[B, H, W\] = "
                                                   r"\(2, 16, 16\), got \(2, 8, 16, 3\)"):
        silhouette.blend_silhouettes(color[:, :8], rast, pos, edges)
    with pytest.raises(SilhouetteInputError, match=r"num_vertices: expected a non-negative int, got -1"):
        silhouette.silhouette_topology(tri, -1)
    with pytest.raises(RasterInputError, match=r"method: expected one of \('walk', 'pixel'\), got 'edge'"):
        raster.antialias(color, rast, pos, tri, method="edge")
    pixel_topo = raster.antialias_topology(tri, verts.shape[0], backend=CTX, method="pixel")
    with pytest.raises(RasterInputError, match=r"topology: expected antialias_topology\(tri, V, method='walk'\), "
                                               r"got one built for method 'pixel'"):
        raster.antialias(color, rast, pos, tri, backend=CTX, topology=pixel_topo, method="walk")
    with pytest.raises(RasterInputError, match=r"topology: expected antialias_topology\(tri, V, method='pixel'\), "
                                               r"got one built for method 'walk'"):
        raster.antialias(color, rast, pos, tri, backend=CTX, topology=topo, method="pixel")


# ------------------------------------------------------------------------------------------------
# CUDA: the Triton kernel against the fixed-size PyTorch walk, and inside a CUDA graph


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_walk_kernels_agree_and_replay_from_a_cuda_graph() -> None:
    ctx = raster.make_context("cuda")
    verts, tri = (t.cuda() for t in icosphere(4))
    mvp = _two_views().cuda()
    pos, rast = _render(verts, tri, mvp, 128, ctx)
    topology = silhouette.silhouette_topology(tri, verts.shape[0])
    ref = silhouette.find_silhouette_edges(rast, pos.detach(), tri, topology, kernel="torch")
    got = silhouette.find_silhouette_edges(rast, pos.detach(), tri, topology, kernel="triton")
    # The kernel avoids fused multiply-adds and uses IEEE division, as the reference's kernels.
    assert torch.equal(got, ref) and int((ref[..., 0] >= 0).sum()) > 100
    graphed = GraphedFunction(lambda c, r, p, t, static: raster.antialias(c, r, p, t, backend=ctx, method="walk"),
                              "walk antialias", "render_cuda_graph")
    for s in (1.0, 1.02):                       # capture, then replay on moved vertices
        pos, rast = _render(verts * s, tri, mvp, 128, ctx)
        color = (rast[..., 3:] > 0).float().expand(-1, -1, -1, 3).contiguous()
        outs = []
        for fn in (graphed, None):
            p = pos.detach().clone().requires_grad_(True)
            out = fn(color, rast, p, tri, static=None) if fn else raster.antialias(color, rast, p, tri, backend=ctx, method="walk")
            outs.append((out.clone(), *torch.autograd.grad((out * color).sum(), p)))
        for a, b in zip(*outs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert graphed.captures == 1


# ------------------------------------------------------------------------------------------------
# The config key reaches the geometry stages' renderer
def test_config_key_chooses_the_stage_renderers_antialias() -> None:
    """antialias=walk/pixel in a config: the geometry stage's render (IMAGE input) equals the
    direct render with that method, and on a 20,480-face sphere only the walk moves the silhouette."""
    verts, tri = icosphere(5)
    cams = validation_cameras(CameraOptions(resolution=(96, 96), fovy_range=(45.0, 45.0)), "cpu", n=1)
    grads = {}
    for method in ("pixel", "walk"):
        cfg = load_config(REPO / "configs" / "tiny_cpu_geometry.json", [f"antialias={method}"])
        scale = torch.ones((), requires_grad=True)
        img = NormalStageRenderer(cfg, CTX)(verts * scale, tri, cams, StageInput(IMAGE))   # [1, 3, H, W]
        direct = render_normal_mask(CTX, verts, tri, cams.mvp, cams.campos, cams.resolution, antialias=method)
        torch.testing.assert_close(img.detach(), normal_to_display(direct).permute(0, 3, 1, 2), rtol=0, atol=0)
        grads[method] = float(torch.autograd.grad(img.sum(), scale)[0])
    # Growing the sphere turns black background into lit surface: the image sum rises with it.
    assert grads["walk"] > 0 and abs(grads["pixel"]) < 0.2 * grads["walk"], grads
