"""Fused Triton kernels for the hash-grid encoding (forward, backward to table and inputs).

Mirrors `geometry.hashgrid.hash_encode_torch` operation by operation (normalization, clamped
cell, corner order, weight products), so values agree to fp32 rounding. One program handles
BLOCK points on one level: the grid is (point blocks, levels), and since blocks along the first
axis are scheduled first, the device works through the levels roughly one at a time, so the rows
being gathered are one level's table (4 MiB at 2^19 x 2 fp32) rather than all sixteen (64 MiB,
more than the L2 cache). A backward that needs the input gradient instead loops over the levels
in one program, which keeps that gradient a plain store (no atomics); the table gradient uses
atomic adds because many points share a row.

Imported by geometry/hashgrid.py when triton is installed: `@triton.jit` decides between compiled
and interpreted mode at import time from TRITON_INTERPRET.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from geometry.hashgrid_layout import PRIMES, GridLayout

_P1: tl.constexpr = tl.constexpr(PRIMES[1])
_P2: tl.constexpr = tl.constexpr(PRIMES[2])
BLOCK = 128
# No FMA contraction: keeps the kernel's rounding identical to the unfused reference ops (the
# kernel is memory-bound, so this costs nothing measurable) and pins Triton's changing default.
_COMPILE_OPTS = {"enable_fp_fusion": False}


@triton.jit
def _level_rows(cx, cy, cz, res_i, dense, level_off, HASH_MASK: tl.constexpr):
    """int64 table rows of lattice points (cx, cy, cz) (int64) on one level."""
    stride = (res_i + 1).to(tl.int64)
    dense_row = cx + cy * stride + cz * stride * stride
    # Low 32 bits of the int64 products equal the uint32 instant-ngp hash; the mask keeps < 2^30.
    hashed = (cx ^ (cy * _P1) ^ (cz * _P2)) & HASH_MASK
    return tl.where(dense != 0, dense_row, hashed) + level_off


@triton.jit
def _normalized(x_ptr, n, mask, lo_ptr, hi_ptr, axis: tl.constexpr):
    """Point coordinate `axis` mapped to [0, 1] in the AABB; also whether it was inside (grad mask)."""
    x = tl.load(x_ptr + n * 3 + axis, mask=mask, other=0.0)
    lo = tl.load(lo_ptr + axis)
    hi = tl.load(hi_ptr + axis)
    ext = hi - lo
    # IEEE round-to-nearest division, as torch: Triton's default fp32 '/' is approximate on GPU,
    # which moved points across cell boundaries (7.8e-4 forward error on the first H200 run).
    t = tl.math.div_rn(x - lo, ext)
    inside = (t >= 0.0) & (t <= 1.0)
    return tl.minimum(tl.maximum(t, 0.0), 1.0), inside, ext


@triton.jit
def _level_cell(tx, ty, tz, res_ptr, dense_ptr, off_ptr, lvl):
    """One level's lattice cell of points at normalized (tx, ty, tz): the level's resolution (int,
    float), dense flag and row offset, the fractional position in the cell and its int64 corner."""
    res_i = tl.load(res_ptr + lvl)
    res = res_i.to(tl.float32)
    dense = tl.load(dense_ptr + lvl)
    level_off = tl.load(off_ptr + lvl)
    px, py, pz = tx * res, ty * res, tz * res
    fx0 = tl.minimum(tl.floor(px), res - 1.0)
    fy0 = tl.minimum(tl.floor(py), res - 1.0)
    fz0 = tl.minimum(tl.floor(pz), res - 1.0)
    return (res_i, res, dense, level_off, px - fx0, py - fy0, pz - fz0,
            fx0.to(tl.int64), fy0.to(tl.int64), fz0.to(tl.int64))


@triton.jit
def _corner_weights(c: tl.constexpr, fx, fy, fz):
    """Trilinear weights per axis (wx, wy, wz) of corner c of the cell (bit 0: x, 1: y, 2: z set =
    the far corner on that axis). `c` is a compile-time constant (the callers' unrolled loop)."""
    wx = fx if (c & 1) == 1 else 1.0 - fx
    wy = fy if ((c >> 1) & 1) == 1 else 1.0 - fy
    wz = fz if ((c >> 2) & 1) == 1 else 1.0 - fz
    return wx, wy, wz


@triton.jit
def _corner_rows(c: tl.constexpr, x0, y0, z0, res_i, dense, level_off, HASH_MASK: tl.constexpr):
    """Table rows of corner c of the cells at (x0, y0, z0). Kept apart from the weights so each
    kernel orders the two as its measured version did (the PTX then matches it op for op)."""
    return _level_rows(x0 + (c & 1), y0 + ((c >> 1) & 1), z0 + ((c >> 2) & 1), res_i, dense, level_off,
                       HASH_MASK)


@triton.jit
def _hash_fwd_kernel(x_ptr, table_ptr, out_ptr, lo_ptr, hi_ptr, res_ptr, dense_ptr, off_ptr, N,
                     L: tl.constexpr, F: tl.constexpr, HASH_MASK: tl.constexpr,
                     BLOCK: tl.constexpr):
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    n64 = n.to(tl.int64)
    fr = tl.arange(0, F)
    tx, _ix, _ex = _normalized(x_ptr, n64, mask, lo_ptr, hi_ptr, 0)
    ty, _iy, _ey = _normalized(x_ptr, n64, mask, lo_ptr, hi_ptr, 1)
    tz, _iz, _ez = _normalized(x_ptr, n64, mask, lo_ptr, hi_ptr, 2)
    lvl = tl.program_id(1)
    res_i, res, dense, level_off, fx, fy, fz, x0, y0, z0 = _level_cell(
        tx, ty, tz, res_ptr, dense_ptr, off_ptr, lvl)
    acc = tl.zeros((BLOCK, F), dtype=tl.float32)
    for c in tl.static_range(8):
        wx, wy, wz = _corner_weights(c, fx, fy, fz)
        w = wx * wy * wz
        rows = _corner_rows(c, x0, y0, z0, res_i, dense, level_off, HASH_MASK)
        feat = tl.load(table_ptr + rows[:, None] * F + fr[None, :], mask=mask[:, None], other=0.0)
        acc += w[:, None] * feat
    tl.store(out_ptr + n64[:, None] * (L * F) + lvl * F + fr[None, :], acc, mask=mask[:, None])


@triton.jit
def _hash_bwd_kernel(x_ptr, table_ptr, gout_ptr, gtable_ptr, gx_ptr, lo_ptr, hi_ptr, res_ptr,
                     dense_ptr, off_ptr, N, L: tl.constexpr, F: tl.constexpr,
                     HASH_MASK: tl.constexpr, NEED_TABLE: tl.constexpr, NEED_X: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Grid (point blocks, levels) without NEED_X (one level per program); (point blocks, 1) with
    it (every level in one program, so the input gradient needs no atomics)."""
    n = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    n64 = n.to(tl.int64)
    fr = tl.arange(0, F)
    tx, in_x, ex = _normalized(x_ptr, n64, mask, lo_ptr, hi_ptr, 0)
    ty, in_y, ey = _normalized(x_ptr, n64, mask, lo_ptr, hi_ptr, 1)
    tz, in_z, ez = _normalized(x_ptr, n64, mask, lo_ptr, hi_ptr, 2)
    gx = tl.zeros((BLOCK,), dtype=tl.float32)
    gy = tl.zeros((BLOCK,), dtype=tl.float32)
    gz = tl.zeros((BLOCK,), dtype=tl.float32)
    first = 0 if NEED_X else tl.program_id(1)
    for lvl in range(first, L if NEED_X else first + 1):
        res_i, res, dense, level_off, fx, fy, fz, x0, y0, z0 = _level_cell(
            tx, ty, tz, res_ptr, dense_ptr, off_ptr, lvl)
        g = tl.load(gout_ptr + n64[:, None] * (L * F) + lvl * F + fr[None, :], mask=mask[:, None],
                    other=0.0)  # [BLOCK, F]
        # Points whose gradient is exactly zero at this level add nothing: skip their atomics (in
        # the geometry stages only vertices next to the surface get a gradient, ~1 in 5 at grid
        # 128). `g != 0` keeps NaN and inf, so non-finite gradients still reach the table.
        live = mask & (tl.sum((g != 0.0).to(tl.int32), axis=1) > 0)
        lgx = tl.zeros((BLOCK,), dtype=tl.float32)
        lgy = tl.zeros((BLOCK,), dtype=tl.float32)
        lgz = tl.zeros((BLOCK,), dtype=tl.float32)
        for c in tl.static_range(8):
            wx, wy, wz = _corner_weights(c, fx, fy, fz)
            rows = _corner_rows(c, x0, y0, z0, res_i, dense, level_off, HASH_MASK)
            ptrs = rows[:, None] * F + fr[None, :]
            if NEED_TABLE:
                w = wx * wy * wz
                tl.atomic_add(gtable_ptr + ptrs, w[:, None] * g, mask=live[:, None])
            if NEED_X:
                feat = tl.load(table_ptr + ptrs, mask=mask[:, None], other=0.0)
                dot = tl.sum(feat * g, axis=1)  # dL/dw for this corner
                # d wx / d fx = +1 for the far corner, -1 for the near one (same for y, z).
                sx = 1.0 if (c & 1) == 1 else -1.0
                sy = 1.0 if ((c >> 1) & 1) == 1 else -1.0
                sz = 1.0 if ((c >> 2) & 1) == 1 else -1.0
                lgx += dot * (sx * wy * wz)
                lgy += dot * (wx * sy * wz)
                lgz += dot * (wx * wy * sz)
        gx += lgx * res  # d pos / d t = res
        gy += lgy * res
        gz += lgz * res
    if NEED_X:
        # d t / d x = 1 / extent inside the AABB, 0 where the clamp was active (as torch.clamp).
        gx = tl.where(in_x, tl.math.div_rn(gx, ex), 0.0)
        gy = tl.where(in_y, tl.math.div_rn(gy, ey), 0.0)
        gz = tl.where(in_z, tl.math.div_rn(gz, ez), 0.0)
        tl.store(gx_ptr + n64 * 3 + 0, gx, mask=mask)
        tl.store(gx_ptr + n64 * 3 + 1, gy, mask=mask)
        tl.store(gx_ptr + n64 * 3 + 2, gz, mask=mask)


@functools.lru_cache(maxsize=32)
def _layout_tensors(layout: GridLayout, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Per-level (resolution, dense flag, row offset) on `device`; cached so that a training step
    does not pay three host-to-device copies per call."""
    res = torch.tensor(layout.resolutions, dtype=torch.int32, device=device)
    dense = torch.tensor([int(d) for d in layout.dense], dtype=torch.int32, device=device)
    off = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
    return res, dense, off


class _HashEncodeFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_nx3: torch.Tensor, table_rxf: torch.Tensor, aabb_2x3: torch.Tensor,
                layout: GridLayout) -> torch.Tensor:
        n_points, n_feat = x_nx3.shape[0], table_rxf.shape[1]
        n_levels = len(layout.resolutions)
        res, dense, off = _layout_tensors(layout, x_nx3.device)
        out = torch.empty(n_points, n_levels * n_feat, device=x_nx3.device, dtype=torch.float32)
        grid = (triton.cdiv(n_points, BLOCK), n_levels)
        if n_points:
            _hash_fwd_kernel[grid](x_nx3, table_rxf, out, aabb_2x3[0], aabb_2x3[1], res, dense, off,
                                   n_points, L=n_levels, F=n_feat, HASH_MASK=layout.hash_size - 1,
                                   BLOCK=BLOCK, **_COMPILE_OPTS)
        ctx.save_for_backward(x_nx3, table_rxf, aabb_2x3)
        ctx.layout = layout
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, gout: torch.Tensor):
        x_nx3, table_rxf, aabb_2x3 = ctx.saved_tensors
        layout: GridLayout = ctx.layout
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gout = gout.contiguous().float()
        n_points, n_feat = x_nx3.shape[0], table_rxf.shape[1]
        gtable = torch.zeros_like(table_rxf) if need_table else None
        gx = torch.empty_like(x_nx3) if need_x else None
        if n_points and (need_x or need_table):
            res, dense, off = _layout_tensors(layout, x_nx3.device)
            grid = (triton.cdiv(n_points, BLOCK), 1 if need_x else len(layout.resolutions))
            _hash_bwd_kernel[grid](
                x_nx3, table_rxf, gout, gtable if need_table else table_rxf,
                gx if need_x else x_nx3, aabb_2x3[0], aabb_2x3[1], res, dense, off, n_points,
                L=len(layout.resolutions), F=n_feat, HASH_MASK=layout.hash_size - 1,
                NEED_TABLE=need_table, NEED_X=need_x, BLOCK=BLOCK, **_COMPILE_OPTS)
        elif need_x:
            gx.zero_()
        return gx, gtable, None, None


def hash_encode_triton(x_nx3: torch.Tensor, table_rxf: torch.Tensor, aabb_2x3: torch.Tensor,
                       layout: GridLayout) -> torch.Tensor:
    """Fused encoding of world points [N, 3] -> [N, L*F] float32 (fp32 compute)."""
    if table_rxf.dtype != torch.float32:
        raise TypeError(f"triton hash grid: table must be float32; got {table_rxf.dtype}")
    x = x_nx3.float().contiguous()
    aabb = aabb_2x3.float().contiguous()
    return _HashEncodeFn.apply(x, table_rxf.contiguous(), aabb, layout)
