"""Fused Triton kernels for marching tets' classification (geometry.marching_tets._classify_torch).

The PyTorch reference takes ~29 kernels over the grid's ~1.5M tets and ~1.8M edges at grid 128
(gathers, reductions, four counts); these two kernels give the same outputs, bit for bit (they
are integer and comparison ops only), in two passes: one over tets (corner code, corners inside,
crossing flag, the crossing and two-triangle counts) and one over edges and vertices (crossing
flag and count, non-finite SDF count). Counts are int32 atomic sums: order-free, so exact.

Imported by geometry/marching_tets.py where triton is installed; used with the hash grid's Triton
kernels (DMTetGeometry with backend "triton").
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _inside(sdf_ptr, idx, mask):
    """1 where sdf[idx] < 0 (NaN: 0, as the reference's comparison), int32."""
    return (tl.load(sdf_ptr + idx, mask=mask, other=1.0) < 0).to(tl.int32)


@triton.jit
def _classify_tets_kernel(sdf_ptr, tets_ptr, code_ptr, n_in_ptr, active_ptr, counts_ptr, T,
                          BLOCK: tl.constexpr):
    t = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = t < T
    c0 = _inside(sdf_ptr, tl.load(tets_ptr + 4 * t, mask=m, other=0), m)
    c1 = _inside(sdf_ptr, tl.load(tets_ptr + 4 * t + 1, mask=m, other=0), m)
    c2 = _inside(sdf_ptr, tl.load(tets_ptr + 4 * t + 2, mask=m, other=0), m)
    c3 = _inside(sdf_ptr, tl.load(tets_ptr + 4 * t + 3, mask=m, other=0), m)
    n_in = c0 + c1 + c2 + c3
    active = (n_in > 0) & (n_in < 4)
    tl.store(code_ptr + t, (c0 + 2 * c1 + 4 * c2 + 8 * c3).to(tl.uint8), mask=m)
    tl.store(n_in_ptr + t, n_in.to(tl.uint8), mask=m)
    tl.store(active_ptr + t, active, mask=m)
    tl.atomic_add(counts_ptr + 1, tl.sum((active & m).to(tl.int32), axis=0))
    tl.atomic_add(counts_ptr + 2, tl.sum(((n_in == 2) & m).to(tl.int32), axis=0))


@triton.jit
def _classify_edges_kernel(sdf_ptr, edges_ptr, crossing_ptr, counts_ptr, E, V, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = i < E
    crossing = (_inside(sdf_ptr, tl.load(edges_ptr + 2 * i, mask=m, other=0), m)
                != _inside(sdf_ptr, tl.load(edges_ptr + 2 * i + 1, mask=m, other=0), m))
    tl.store(crossing_ptr + i, crossing, mask=m)
    tl.atomic_add(counts_ptr + 3, tl.sum((crossing & m).to(tl.int32), axis=0))
    # The same lanes count non-finite SDF values over the vertices (the grid covers max(E, V)).
    mv = i < V
    s = tl.load(sdf_ptr + i, mask=mv, other=0.0)
    bad = ((s != s) | (tl.abs(s) == float("inf"))) & mv
    tl.atomic_add(counts_ptr + 0, tl.sum(bad.to(tl.int32), axis=0))


def classify_triton(sdf_v: torch.Tensor, tets_tx4: torch.Tensor, edges_ex2: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(code [T] uint8, n_in [T] uint8, active [T] bool, crossing [E] bool, counts [4] int64):
    geometry.marching_tets._classify_torch's outputs for sdf_v [V] float32, tets [T, 4] and edges [E, 2]
    int64, all contiguous on one device (CUDA, or CPU under TRITON_INTERPRET=1)."""
    if sdf_v.dtype != torch.float32 or tets_tx4.dtype != torch.int64 or edges_ex2.dtype != torch.int64:
        raise TypeError(f"classify_triton: expected float32 sdf and int64 tets/edges, got {sdf_v.dtype}, "
                        f"{tets_tx4.dtype}, {edges_ex2.dtype}")
    sdf_v, tets_tx4, edges_ex2 = sdf_v.contiguous(), tets_tx4.contiguous(), edges_ex2.contiguous()
    n_tets, n_edges, n_verts = tets_tx4.shape[0], edges_ex2.shape[0], sdf_v.shape[0]
    dev = sdf_v.device
    code = torch.empty(n_tets, dtype=torch.uint8, device=dev)
    n_in = torch.empty(n_tets, dtype=torch.uint8, device=dev)
    active = torch.empty(n_tets, dtype=torch.bool, device=dev)
    crossing = torch.empty(n_edges, dtype=torch.bool, device=dev)
    counts = torch.zeros(4, dtype=torch.int32, device=dev)
    _classify_tets_kernel[(triton.cdiv(n_tets, BLOCK),)](sdf_v, tets_tx4, code, n_in, active, counts, n_tets,
                                                         BLOCK=BLOCK)
    _classify_edges_kernel[(triton.cdiv(max(n_edges, n_verts), BLOCK),)](sdf_v, edges_ex2, crossing, counts,
                                                                        n_edges, n_verts, BLOCK=BLOCK)
    return code, n_in, active, crossing, counts.to(torch.int64)
