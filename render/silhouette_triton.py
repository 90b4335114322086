"""The silhouette walk (render/silhouette.py) as one Triton kernel: one program per block of pixel
pairs, each lane walking its pair's segment triangle by triangle; a block stops when all its lanes
have.

The PyTorch reference (silhouette._walk_torch) runs every step over every pair with masks on CUDA:
~70 kernels per step, MAX_STEPS steps. Here a lane's loads, projections and tests stay in registers,
and a block runs only as many steps as its longest walk. The arithmetic is the reference's, op by op, with
IEEE division (div_rn) and without fused multiply-adds (enable_fp_fusion=False), so both record
the same edges.

Imported by render/silhouette.py where triton is installed; runs on CUDA, or on the CPU under
TRITON_INTERPRET=1 (set before this module is imported).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 128
_F32_MAX = tl.constexpr(3.402823466e38)


@triton.jit
def _same_sign(a, b):
    """Sign-bit comparison (+0 and -0 differ), as the reference's torch.signbit."""
    return (a.to(tl.int32, bitcast=True) ^ b.to(tl.int32, bitcast=True)) >= 0


@triton.jit
def _gt(n0, n1, d0, d1):
    return (n0 * d1 > n1 * d0) == _same_sign(d0, d1)


@triton.jit
def _front(front_ptr, row, mask):
    """The vertex at `row` is in front of the camera (w > 0; int8 flags)."""
    return tl.load(front_ptr + row, mask=mask, other=0) != 0


@triton.jit
def _xy(sxy_ptr, row, mask, fx, fy):
    """Screen position of vertex `row` relative to the walk's origin (fx, fy)."""
    x = tl.load(sxy_ptr + row * 2, mask=mask, other=0.0)
    y = tl.load(sxy_ptr + row * 2 + 1, mask=mask, other=0.0)
    return x - fx, y - fy


@triton.jit
def _pick(e, a0, a1, a2):
    return tl.where(e == 0, a0, tl.where(e == 1, a1, a2))


@triton.jit
def _walk_kernel(rast_ptr, sxy_ptr, front_ptr, tri_ptr, nbr_ptr, nedge_ptr, out_ptr,
                 n_pix, H, W, F, v_stride, xh, yh, max_steps, eps, BLOCK: tl.constexpr):
    q = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)       # pair index into [2, B, H, W]
    in_range = q < 2 * n_pix
    d = q // n_pix
    pixel0 = q - d * n_pix
    x = pixel0 % W
    y = (pixel0 // W) % H
    bi = pixel0 // (H * W)
    down = d == 1
    inside = in_range & tl.where(down, y < H - 1, x < W - 1)
    pixel1 = tl.where(inside, pixel0 + tl.where(down, W, 1), pixel0)
    t0 = tl.load(rast_ptr + pixel0 * 4 + 3, mask=in_range, other=0.0)
    t1 = tl.load(rast_ptr + pixel1 * 4 + 3, mask=in_range, other=0.0)
    z0 = tl.load(rast_ptr + pixel0 * 4 + 2, mask=in_range, other=0.0)
    z1 = tl.load(rast_ptr + pixel1 * 4 + 2, mask=in_range, other=0.0)
    tri0 = t0.to(tl.int64) - 1
    tri1 = t1.to(tl.int64) - 1
    use1 = (tri0 < 0) | ((tri1 >= 0) & (z1 <= z0))                       # the nearer triangle, or the only one
    fg = tl.where(use1, tri1, tri0)
    active = inside & (t0 != t1) & (fg >= 0) & (fg < F)
    px = x + tl.where(use1 & (d == 0), 1, 0)
    py = y + tl.where(use1 & down, 1, 0)
    fx = px.to(tl.float32) + 0.5 - xh
    fy = py.to(tl.float32) + 0.5 - yh
    ds = tl.where(use1, -1.0, 1.0)
    vbase = bi * v_stride
    cur = tl.where(active, fg, 0)
    entry = tl.full([BLOCK], -1, tl.int64)
    ea = tl.full([BLOCK], -1, tl.int32)
    eb = tl.full([BLOCK], -1, tl.int32)
    step = tl.full([], 0, tl.int32)
    go = (tl.sum(active.to(tl.int32), axis=0) > 0) & (step < max_steps)
    while go:
        v0 = tl.load(tri_ptr + cur * 3, mask=active, other=0)
        v1 = tl.load(tri_ptr + cur * 3 + 1, mask=active, other=0)
        v2 = tl.load(tri_ptr + cur * 3 + 2, mask=active, other=0)
        n0 = tl.load(nbr_ptr + cur * 3, mask=active, other=-1).to(tl.int64)
        n1 = tl.load(nbr_ptr + cur * 3 + 1, mask=active, other=-1).to(tl.int64)
        n2 = tl.load(nbr_ptr + cur * 3 + 2, mask=active, other=-1).to(tl.int64)
        e0 = tl.load(nedge_ptr + cur * 3, mask=active, other=-1).to(tl.int64)
        e1 = tl.load(nedge_ptr + cur * 3 + 1, mask=active, other=-1).to(tl.int64)
        e2 = tl.load(nedge_ptr + cur * 3 + 2, mask=active, other=-1).to(tl.int64)
        # Wing vertices: the neighbour's vertex across each edge, the own vertex where none (a silhouette).
        o0 = tl.where(n0 >= 0, tl.load(tri_ptr + n0 * 3 + e0, mask=active & (n0 >= 0), other=0), v0)
        o1 = tl.where(n1 >= 0, tl.load(tri_ptr + n1 * 3 + e1, mask=active & (n1 >= 0), other=0), v1)
        o2 = tl.where(n2 >= 0, tl.load(tri_ptr + n2 * 3 + e2, mask=active & (n2 >= 0), other=0), v2)
        r0, r1, r2 = vbase + v0, vbase + v1, vbase + v2
        q0, q1, q2 = vbase + o0, vbase + o1, vbase + o2
        ok = (_front(front_ptr, r0, active) & _front(front_ptr, r1, active) & _front(front_ptr, r2, active)
              & _front(front_ptr, q0, active) & _front(front_ptr, q1, active) & _front(front_ptr, q2, active))
        x0, y0 = _xy(sxy_ptr, r0, active, fx, fy)
        x1, y1 = _xy(sxy_ptr, r1, active, fx, fy)
        x2, y2 = _xy(sxy_ptr, r2, active, fx, fy)
        ox0, oy0 = _xy(sxy_ptr, q0, active, fx, fy)
        ox1, oy1 = _xy(sxy_ptr, q1, active, fx, fy)
        ox2, oy2 = _xy(sxy_ptr, q2, active, fx, fy)
        bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)
        sil0 = _same_sign((x1 - ox0) * (y2 - oy0) - (x2 - ox0) * (y1 - oy0), bb)
        sil1 = _same_sign((x2 - ox1) * (y0 - oy1) - (x0 - ox1) * (y2 - oy1), bb)
        sil2 = _same_sign((x0 - ox2) * (y1 - oy2) - (x1 - ox2) * (y0 - oy2), bb)
        # The frame where the pair is horizontal (x and y swapped for vertical pairs).
        sx0 = tl.where(down, y0, x0)
        sy0 = tl.where(down, x0, y0)
        sx1 = tl.where(down, y1, x1)
        sy1 = tl.where(down, x1, y1)
        sx2 = tl.where(down, y2, x2)
        sy2 = tl.where(down, x2, y2)
        dx0, dx1, dx2 = sx2 - sx1, sx0 - sx2, sx1 - sx0
        dy0, dy1, dy2 = sy2 - sy1, sy0 - sy2, sy1 - sy0
        dn0 = ds * (sx1 * dy0 - sy1 * dx0)
        dn1 = ds * (sx2 * dy1 - sy2 * dx1)
        dn2 = ds * (sx0 * dy2 - sy0 * dx2)
        nc0 = _same_sign(sy1, sy2) | (entry == 0)
        nc1 = _same_sign(sy2, sy0) | (entry == 1)
        nc2 = _same_sign(sy0, sy1) | (entry == 2)
        m0 = tl.where(nc0, -_F32_MAX, dn0)
        m1 = tl.where(nc1, -_F32_MAX, dn1)
        m2 = tl.where(nc2, -_F32_MAX, dn2)
        k0 = tl.where(nc0, 1.0, dy0)
        k1 = tl.where(nc1, 1.0, dy1)
        k2 = tl.where(nc2, 1.0, dy2)
        g10 = _gt(m1, m0, k1, k0)
        g20 = _gt(m2, m0, k2, k0)
        g21 = _gt(m2, m1, k2, k1)
        e = tl.where(g20 & g21, 2, tl.where(g10, 1, 0))                 # the exit edge
        crosses = _pick(e, nc0, nc1, nc2) == 0
        dy_e = _pick(e, dy0, dy1, dy2)
        dx_e = _pick(e, dx0, dx1, dx2)
        t = tl.div_rn(_pick(e, dn0, dn1, dn2), tl.where(crosses, dy_e, 1.0))
        leaves = active & ok & crosses & (t < 1.0 + eps)
        sil_e = _pick(e, sil0, sil1, sil2)
        record = leaves & sil_e & (tl.abs(dy_e) >= tl.abs(dx_e)) & (t > -eps)
        ea = tl.where(record, _pick(e, v1, v2, v0), ea)
        eb = tl.where(record, _pick(e, v2, v0, v1), eb)
        nb_e = _pick(e, n0, n1, n2)
        active = leaves & (sil_e == 0) & (nb_e >= 0)
        cur = tl.where(active, nb_e, 0)
        entry = tl.where(active, _pick(e, e0, e1, e2), -1)
        step += 1
        go = (tl.sum(active.to(tl.int32), axis=0) > 0) & (step < max_steps)
    tl.store(out_ptr + q * 2, ea, mask=in_range)
    tl.store(out_ptr + q * 2 + 1, eb, mask=in_range)


def find_silhouette_edges_triton(rast: torch.Tensor, sxy: torch.Tensor, front: torch.Tensor, tri: torch.Tensor,
                                 neighbour: torch.Tensor, neighbour_edge: torch.Tensor, v_stride: int,
                                 max_steps: int, eps: float) -> torch.Tensor:
    """int32 [2, B, H, W, 2] edges, silhouette._walk_torch's output. rast float32 [B, H, W, 4];
    sxy float32 [N, 2] and front bool [N] from silhouette.screen_positions; tri, neighbour,
    neighbour_edge int32 [F, 3]; all contiguous on one device (checked by the caller)."""
    b, h, w, _ = rast.shape
    n_pix = b * h * w
    out = torch.empty((2, b, h, w, 2), dtype=torch.int32, device=rast.device)
    if n_pix == 0:
        return out
    grid = (triton.cdiv(2 * n_pix, BLOCK),)
    _walk_kernel[grid](rast, sxy, front.to(torch.int8), tri, neighbour, neighbour_edge, out,
                       n_pix, h, w, tri.shape[0], v_stride, 0.5 * w, 0.5 * h, max_steps, eps,
                       BLOCK=BLOCK, num_warps=4, enable_fp_fusion=False)
    return out
