"""A differentiable tensor function replayed from CUDA graphs (its forward and its backward).

Why: after nvdiffrast's rasterizer returns, the GPU has drained its queue (the rasterizer reads
its overflow counters back and synchronizes), so every op the host launches next runs on an idle
GPU, one Python launch at a time. Replaying those ops from a graph turns ~30 launches into one.

How (the recipe of torch.cuda.make_graphed_callables, with two differences):
- Each GraphedFunction captures on its own stream. PyTorch (>= 2.11) clears the cuBLAS
  workspaces of a graph's capture stream when that graph is destroyed; graphs sharing the default
  capture stream (the UNet's, sd.CudaGraphUNet) would lose theirs when this one is recaptured.
- One capture is kept: a new input signature (the surface buffers were resized, or the stage
  changed) releases the old graphs *before* capturing new ones, for the same reason.

Replays write into static buffers: the output of a call is valid until the next call, and its
gradient until the next backward. A training step consumes both before the next call.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch
from torch import Tensor


class CudaGraphCaptureError(RuntimeError):
    """Capturing a function in a CUDA graph failed (the message names the function and the switch)."""


@dataclass
class _Capture:
    key: tuple
    generation: int
    static_in: list[Tensor]            # inputs, copied into before every forward replay
    static_out: Tensor                 # the forward's output
    static_grad_out: Tensor            # the output's gradient, copied into before a backward replay
    static_grads: list[Tensor | None]  # gradient of each input (None: no gradient)
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph


class GraphedFunction:
    """``fn(*tensors, static) -> Tensor`` replayed from CUDA graphs; differentiable.

    ``static`` (hashable) selects a variant of ``fn`` (e.g. the stage); it and the tensors' shapes,
    dtypes, devices and requires_grad flags form the capture key. ``fn`` must be a fixed sequence
    of CUDA ops for a given key: no host reads of device values, no data-dependent shapes.
    ``switch`` names the config key that turns the graph off (quoted in capture errors).
    """

    def __init__(self, fn: Callable[..., Tensor], name: str, switch: str, warmup: int = 1) -> None:
        self.fn, self.name, self.switch, self.warmup = fn, name, switch, warmup
        self.captures = 0                          # how many times a graph was captured
        self._cap: _Capture | None = None
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, *tensors: Tensor, static: Hashable = None) -> Tensor:
        key = (static, tuple((tuple(t.shape), t.dtype, t.device, t.requires_grad) for t in tensors))
        if self._cap is None or self._cap.key != key:
            if not tensors or any(t.device.type != "cuda" for t in tensors):
                raise ValueError(f"{self.name}: CUDA graphs need CUDA tensors, got devices "
                                 f"{sorted({str(t.device) for t in tensors})}")
            if not any(t.requires_grad for t in tensors):
                raise ValueError(f"{self.name}: no input requires grad; call the function itself when no "
                                 "gradient is needed")
            self._recapture(key, tensors, static)
        return _Replay.apply(self, self._cap.generation, *tensors)

    def release(self) -> None:
        """Drop the graphs and their memory (after the device has finished using them)."""
        if self._cap is not None:
            torch.cuda.synchronize(self._cap.static_out.device)
            self._cap = None

    def _recapture(self, key: tuple, tensors: tuple[Tensor, ...], static: Hashable) -> None:
        self.release()   # first: destroying the old graphs clears this stream's cuBLAS workspaces
        device = tensors[0].device
        if self._stream is None:
            # High priority: a stream from the other pool than torch.cuda.Stream()'s default, so
            # never the stream another graph (the UNet's) was captured on.
            self._stream = torch.cuda.Stream(device, priority=-1)
        try:
            self._cap = self._capture(key, tensors, static, self._stream, generation=self.captures + 1)
        except RuntimeError as e:
            raise CudaGraphCaptureError(f"capturing the {self.name} in a CUDA graph failed ({e}); "
                                        f"set {self.switch}=off to run it eagerly") from e
        self.captures += 1

    def _capture(self, key: tuple, tensors: tuple[Tensor, ...], static: Hashable,
                 stream: torch.cuda.Stream, generation: int) -> _Capture:
        static_in = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
        diff_in = [t for t in static_in if t.requires_grad]
        # Warm-up on the capture stream (as torch.cuda.graphs requires): libraries pick their
        # kernels and allocate workspaces, and lazy initialisation happens, outside the capture.
        stream.wait_stream(torch.cuda.current_stream(tensors[0].device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                out = self.fn(*static_in, static)
                torch.autograd.grad(out, diff_in, torch.zeros_like(out), allow_unused=True)
        torch.cuda.current_stream(tensors[0].device).wait_stream(stream)
        pool = torch.cuda.graph_pool_handle()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(fwd, pool=pool, stream=stream):
            static_out = self.fn(*static_in, static)
        static_grad_out = torch.zeros_like(static_out)
        with torch.cuda.graph(bwd, pool=pool, stream=stream):
            grads = torch.autograd.grad(static_out, diff_in, static_grad_out, allow_unused=True)
        by_input = iter(grads)
        static_grads = [next(by_input) if t.requires_grad else None for t in static_in]
        return _Capture(key, generation, static_in, static_out.detach(), static_grad_out, static_grads, fwd, bwd)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, owner: GraphedFunction, generation: int, *tensors: Tensor) -> Tensor:
        cap = owner._cap
        for buf, t in zip(cap.static_in, tensors):
            buf.copy_(t)                 # under no_grad here (autograd.Function.forward)
        cap.fwd.replay()
        # The owner, not the capture: a finished step's autograd nodes must not keep old graphs alive.
        ctx.owner, ctx.generation = owner, generation
        return cap.static_out.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        cap = ctx.owner._cap
        if cap is None or cap.generation != ctx.generation:
            raise RuntimeError(f"{ctx.owner.name}: the CUDA graph was recaptured between this forward and its "
                               "backward; run each backward before the next forward")
        cap.static_grad_out.copy_(grad_out)
        cap.bwd.replay()
        return (None, None, *(g.detach() if g is not None else None for g in cap.static_grads))
