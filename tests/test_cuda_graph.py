"""render/cuda_graph.py and the geometry stages' graphed ops after the rasterizer (render_cuda_graph)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import trimesh

from config import load_config
from dataset.cameras import azimuth_sector, sample_train_cameras
from phases import NormalStageRenderer
from render import raster
from render.cuda_graph import GraphedFunction
from trainer import camera_options

REPO = Path(__file__).resolve().parents[1]


def _cfg(*overrides: str):
    return load_config(REPO / "configs" / "tiny_cpu_geometry.json", list(overrides))


def test_render_graph_on_needs_nvdiffrast_and_auto_stays_eager_on_cpu() -> None:
    ctx = raster.make_context("cpu")
    with pytest.raises(raster.RasterBackendError, match=r"render_cuda_graph=on needs the nvdiffrast rasterizer.*"
                                                        r"got the torch backend on cpu.*auto.*off"):
        NormalStageRenderer(_cfg("render_cuda_graph=on"), ctx)
    assert NormalStageRenderer(_cfg(), ctx).graph is None
    with pytest.raises(Exception, match="render_cuda_graph"):
        _cfg("render_cuda_graph=yes")


def test_graphed_function_refuses_cpu_tensors_and_inputs_without_grad() -> None:
    graphed = GraphedFunction(lambda x, static: x * 2, "doubling", "some_switch")
    with pytest.raises(ValueError, match="doubling: CUDA graphs need CUDA tensors, got devices \\['cpu'\\]"):
        graphed(torch.ones(3, requires_grad=True))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="no input requires grad"):
            graphed(torch.ones(3, device="cuda"))


def _mlp(x: torch.Tensor, w: torch.Tensor, static: float) -> torch.Tensor:
    return torch.tanh(x @ w) * static           # a cuBLAS product: the workspace case below


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_function_matches_eager_and_recaptures_without_breaking_other_graphs() -> None:
    from sd import CudaGraphUNet

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


def _sphere_param(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    s = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    verts = torch.tensor(s.vertices, dtype=torch.float32, device=device)
    return verts, torch.tensor(s.faces, dtype=torch.int64, device=device)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
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
            x = renderer(verts, faces, cams, stage)
            grad_out = torch.sin(torch.arange(x.numel(), device="cuda", dtype=x.dtype).view_as(x))
            (g,) = torch.autograd.grad(x, verts, grad_out)
            outs.append(x.clone())
            grads.append(g)
        # The same kernels in the same order. nvdiffrast's antialiasing adds with atomics (outputs
        # within float32 ulps), and now and then gives a contested silhouette pixel pair to either of
        # two edges: eager against eager, 2 vertices then differ by up to 3% of the largest gradient,
        # the rest by <= 2e-7 of it (docs/benchmarks/perf/session10/lease4/graph_vs_eager.txt). So: every
        # vertex to 1e-5 of that scale, except at most 6 (three contested pairs).
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
        scale = float(grads[1].abs().max())
        assert scale > 0
        off = (grads[0] - grads[1]).abs().amax(1) / scale                       # [V]
        assert int((off > 1e-5).sum()) <= 6, f"{int((off > 1e-5).sum())} vertices differ: {off.topk(8).values}"
    assert graphed.graph.captures == 1
