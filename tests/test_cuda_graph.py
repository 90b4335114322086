"""render/cuda_graph.py and the geometry stages' graphed ops after the rasterizer (render_cuda_graph)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from config import load_config
from phases.geometry import NormalStageRenderer
from render import raster
from render.cuda_graph import GraphedFunction

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
