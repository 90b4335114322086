"""GPU parity: every fused or GPU-only path against its CPU/PyTorch reference, on a CUDA device.

Each test here compares a kernel or a GPU code path (nvdiffrast, Triton, CUDA graphs, side
streams) with the readable reference the CPU suite runs, on values and gradients; tolerances are
justified beside each assertion. The whole file is skipped on machines without CUDA.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
import trimesh

from config import resolve_path
from dataset.cameras import CameraOptions, azimuth_sector, sample_train_cameras
from geometry.dmtet import DMTetGeometry
from geometry.marching_tets import CapacityPlanner
from geometry.fixed_mesh import FixedMeshGeometry
from geometry.hashgrid import HashGridOptions, make_encoder, triton_unavailable_reason
from guidance.base import input_for
from phases.geometry import NormalStageRenderer
from render import raster
from render.cuda_graph import GraphedFunction
from render.pbr_render import rasterize_gbuffer_on
from scripts.dev.gpu_check_hashgrid import parity as hashgrid_parity
from scripts.dev.gpu_check_raster import TOLERANCES as RASTER_TOLERANCES
from scripts.dev.gpu_check_raster import run_parity as raster_parity
from scripts.dev.gpu_check_shading import compare_shade
from sd import CudaGraphUNet, StableDiffusionGuidance
from tests.test_cuda_graph import _cfg
from tests.test_dmtet import classify_parity
from tests.test_hashgrid import AABB
from tests.test_sd import _opts
from trainer import camera_options

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _mlp(x: torch.Tensor, w: torch.Tensor, static: float) -> torch.Tensor:
    return torch.tanh(x @ w) * static           # a cuBLAS product: the workspace case below


def _sphere_param(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    verts = torch.tensor(s.vertices, dtype=torch.float32, device=device)
    return verts, torch.tensor(s.faces, dtype=torch.int64, device=device)


def test_torch_rasterizer_matches_nvdiffrast() -> None:
    results = raster_parity(resolution=512, device="cuda")
    for row in results:
        assert row["coverage_disagreement"] < RASTER_TOLERANCES["coverage_disagreement"], row
        assert row["attr_max_abs_diff"] < RASTER_TOLERANCES["attr_max_abs_diff"], row
        assert row["aa_image_mean_abs_diff"] < RASTER_TOLERANCES["aa_image_mean_abs_diff"], row
        assert row["aa_grad_rel_l1"] < RASTER_TOLERANCES["aa_grad_rel_l1"], row


@pytest.mark.skipif(triton_unavailable_reason() is not None, reason="triton not installed")
def test_triton_kernel_matches_reference_on_gpu() -> None:
    result = hashgrid_parity(torch.device("cuda"), 65_536, HashGridOptions(), seed=0)
    assert result["passed"], result
    assert make_encoder(AABB.cuda(), HashGridOptions()).backend == "triton"


def test_shade_nvdiffrast_lookups_match_the_torch_reference():
    """light.shade on CUDA uses nvdiffrast for its cube/FG lookups; the reference must agree.
    The comparison is the GPU check's (scripts/dev/gpu_check_shading.py, shade_parity)."""
    out = compare_shade(argparse.Namespace(cube_res=128, batch=2, res=256, iters=1, warmup=0),
                        torch.device("cuda"))
    # Values: both sample the same texels with the same weights (fp32 rounding only; measured 1.2e-6).
    assert out["value"]["max_abs"] < 1e-5, out["value"]
    # Gradients: the direction derivative of a cube lookup jumps across face edges, where the two
    # implementations may take the texel step from either face, so single entries there differ
    # (measured max 2e-2 for normals on an H200); the relative L2 over all points bounds the rest
    # (measured <= 2e-5).
    for name in ("normal", "kd", "ks"):
        assert out[name]["rel_l2"] < 1e-4, (name, out[name])


def test_classify_triton_matches_reference_on_gpu() -> None:
    classify_parity("cuda")
    # And the training extraction, end to end: the same padded surface with either classification.
    geo = DMTetGeometry(64, 2.0, device="cuda")
    assert geo.classify_backend == "triton"
    net = geo.sdf_net.forward   # a sphere plus the random network (as above): a surface for sure
    geo.sdf_net.forward = lambda x: (lambda s, d: (0.2 * s + x.norm(dim=1) - 0.6, d))(*net(x))  # type: ignore
    planner = CapacityPlanner()
    fused = geo.extract_padded(planner)
    geo.classify_backend = "torch"
    ref = geo.extract_padded(planner)
    assert torch.equal(fused.faces, ref.faces) and torch.equal(fused.verts, ref.verts)
    assert torch.equal(fused.counts, ref.counts)


def test_cuda_graph_unet_matches_eager(tiny_sd_path: Path) -> None:
    # Uncompiled: the graph then holds the eager call's own kernels (tests/test_compile.py checks the compiled one).
    sd = StableDiffusionGuidance(_opts(tiny_sd_path, add_directional_text=True, diffusion_compile="off"), "cuda")
    assert isinstance(sd.unet_runner, CudaGraphUNet)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(3):   # first call captures; later calls replay with new inputs
        z_t = torch.randn(2, 4, 8, 8, device="cuda", generator=gen)
        t = torch.randint(20, 980, (2,), device="cuda", generator=gen)
        emb = sd.text_embeddings(torch.tensor([step % 4, 2], device="cuda"), 2)
        graphed = sd.predict_eps(z_t, t, emb)
        sd.unet_runner, runner = sd.eager_unet, sd.unet_runner
        eager = sd.predict_eps(z_t, t, emb)
        sd.unet_runner = runner
        # The graph replays the eager call's kernels on copies of the same inputs: equal values.
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
    assert len(sd.unet_runner.graphs) == 1


@pytest.mark.parametrize("stage", ["geometry_coarse", "geometry_fine"])
def test_stage_renderer_graph_matches_eager(stage: str) -> None:
    size = ("train_res=[256,256]", "batch=4")
    cfg_on = _cfg("render_cuda_graph=on", *size)
    ctx = raster.make_context("cuda", "nvdiffrast")
    graphed, eager = NormalStageRenderer(cfg_on, ctx), NormalStageRenderer(_cfg("render_cuda_graph=off", *size), ctx)
    assert graphed.graph is not None and eager.graph is None
    base, faces = _sphere_param("cuda")
    gen = torch.Generator().manual_seed(3)
    dgen = torch.Generator(device="cuda").manual_seed(3)
    opts = camera_options(cfg_on)
    for step in range(3):   # new cameras and a moved surface each step: replays read their new inputs
        cams = sample_train_cameras(4, azimuth_sector(step, 4), opts, gen, "cuda")
        bumped = base * (1 + 0.1 * torch.rand(base.shape[0], 1, device="cuda", generator=dgen))
        outs, grads = [], []
        for renderer in (graphed, eager):
            verts = bumped.clone().requires_grad_(True)
            x = renderer(verts, faces, cams, input_for(stage, cfg_on))
            grad_out = torch.sin(torch.arange(x.numel(), device="cuda", dtype=x.dtype).view_as(x))
            (g,) = torch.autograd.grad(x, verts, grad_out)
            outs.append(x.clone())
            grads.append(g)
        # The same kernels in the same order. nvdiffrast's antialiasing adds with atomics (outputs
        # within float32 ulps), and now and then gives a contested silhouette pixel pair to either of
        # two edges: eager against eager, 2 vertices then differ by up to 3% of the largest gradient,
        # the rest by <= 2e-7 of it (measured on an H200). So: every
        # vertex to 1e-5 of that scale, except at most 6 (three contested pairs).
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        scale = float(grads[1].abs().max())
        assert scale > 0
        off = (grads[0] - grads[1]).abs().amax(1) / scale                       # [V]
        assert int((off > 1e-5).sum()) <= 6, f"{int((off > 1e-5).sum())} vertices differ: {off.topk(8).values}"
    assert graphed.graph.captures == 1


def test_graphed_function_matches_eager_and_recaptures_without_breaking_other_graphs() -> None:
    gen = torch.Generator(device="cuda").manual_seed(0)
    # Another graph captured on the default capture stream, as the UNet's is. PyTorch (>= 2.11)
    # clears the cuBLAS workspaces of a stream when a graph captured on it is destroyed: if the
    # GraphedFunction captured there too, its recapture would break this graph's replays.
    w_unet = torch.randn(64, 64, device="cuda", generator=gen)
    unet = CudaGraphUNet(lambda s, t, e: (s @ w_unet + t[:, None]) @ e)
    graphed = GraphedFunction(_mlp, "test function", "some_switch")
    for n, scale in [(256, 1.0), (256, 1.0), (512, 1.0), (512, 2.0), (256, 1.0)]:   # 4 captures, 1 replay
        x = torch.randn(n, 64, device="cuda", generator=gen, requires_grad=True)
        w = torch.randn(64, 32, device="cuda", generator=gen, requires_grad=True)
        grad_out = torch.randn(n, 32, device="cuda", generator=gen)
        out = graphed(x, w, static=scale)
        got = (out.clone(), *torch.autograd.grad(out, (x, w), grad_out))
        expect_out = _mlp(x, w, scale)
        expect = (expect_out, *torch.autograd.grad(expect_out, (x, w), grad_out))
        # The same ops; cuBLAS may pick another algorithm inside a capture (other workspace), so
        # products can differ in summation order: float32 rounding over 64 terms, ~1e-6 relative.
        for a, b in zip(got, expect):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        s, t, e = (torch.randn(8, 64, device="cuda", generator=gen), torch.randn(8, device="cuda", generator=gen),
                   torch.randn(64, 16, device="cuda", generator=gen))
        torch.testing.assert_close(unet(s, t, e).clone(), (s @ w_unet + t[:, None]) @ e, rtol=1e-5, atol=1e-4)
    assert graphed.captures == 4


def test_gbuffer_on_the_camera_stream_equals_the_current_stream_one() -> None:
    """Cameras copied on a side stream and the G-buffer made there, while the current stream is
    still busy, give the same G-buffer as the current stream; the current stream sees it only
    after it is complete (it waits on the device) and owns it afterwards (record_stream)."""
    mesh = FixedMeshGeometry(resolve_path("data/meshes/bunny_like.obj"), device="cuda").mesh()
    ctx = raster.make_context("cuda", "nvdiffrast")
    side = torch.cuda.Stream(priority=-1)
    opts = CameraOptions(resolution=(256, 256))
    busy = torch.randn(2048, 2048, device="cuda")
    for _ in range(30):                        # ~ms of queued work on the current stream
        busy = torch.tanh(busy @ busy)
    cams = sample_train_cameras(4, (-180.0, 180.0), opts, torch.Generator().manual_seed(0), "cuda", stream=side)
    assert cams.stream is side
    got = rasterize_gbuffer_on(cams.stream, ctx, mesh, cams.mvp, cams.resolution)
    checksum = sum(float(t.float().sum()) for t in got.tensors())   # read on the current stream
    want = rasterize_gbuffer_on(None, ctx, mesh, cams.mvp, cams.resolution)
    for a, b in zip(got.tensors(), want.tensors()):
        assert torch.equal(a, b)
    assert checksum == sum(float(t.float().sum()) for t in want.tensors())
    assert got.covered.numel() > 1000
