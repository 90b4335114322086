"""Pure-PyTorch rasterizer with nvdiffrast semantics (CPU and CUDA).

Conventions (identical to nvdiffrast, see render/raster.py):
- `pos` is clip space: `[B, V, 4]` (instanced mode) or `[V, 4]` with `ranges [B, 2]` (range mode).
- `rast [B, H, W, 4]` = (u, v, z/w, triangle_id + 1), 0 where empty. u and v are the perspective
  correct barycentrics of the triangle's vertex 0 and 1 (vertex 2 gets 1 - u - v).
- Pixel (x, y) samples NDC ((x + 0.5) / W * 2 - 1, (y + 0.5) / H * 2 - 1); image row 0 is NDC y = -1.
- `rast_db [B, H, W, 4]` = (du/dX, du/dY, dv/dX, dv/dY) per pixel.

Algorithm: homogeneous 2-D rasterization (no explicit clipping). For a sample (fx, fy) the edge
functions a_i of a triangle are linear in (fx, fy); the sample is inside when all a_i have the
sign of det = sum_i w_i a_i (which is constant over the image) and -1 <= z/w <= 1. Triangles are
expanded into (triangle, pixel) candidates over their screen bounding boxes in memory-bounded chunks,
and a packed (depth, triangle id) int64 key resolves visibility with `scatter_reduce(amin)`.
Differentiable quantities (barycentrics, their pixel derivatives, antialias blend weights) are then
recomputed for the winners only, with autograd supplying the gradients nvdiffrast computes by hand.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Candidate (triangle, pixel) pairs evaluated at once; bounds peak memory (~60 bytes per pair).
DEFAULT_MAX_PAIRS = 1 << 21
_F32_MAX = 3.402823466e38
_KEY_EMPTY = torch.iinfo(torch.int64).max
MAX_TRIANGLES = 1 << 24  # triangle ids are stored exactly in float32 up to 2^24


# ----------------------------------------------------------------------------------------------
# Shared helpers


def same_sign(a: Tensor, b: Tensor) -> Tensor:
    """Sign-bit comparison, like nvdiffrast's same_sign (so +0 and -0 differ)."""
    return torch.signbit(a) == torch.signbit(b)


def _sortable_float_key(x: Tensor) -> Tensor:
    """float32 -> int64 whose integer order equals the float order."""
    bits = x.contiguous().view(torch.int32)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64)


def _pixel_centers(width: int, height: int, px: Tensor, py: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel indices -> NDC sample position, with nvdiffrast's exact float expression."""
    xs, xo = 2.0 / width, 1.0 / width - 1.0
    ys, yo = 2.0 / height, 1.0 / height - 1.0
    return px.to(torch.float32) * xs + xo, py.to(torch.float32) * ys + yo


def _triangle_items(pos: Tensor, tri: Tensor, ranges: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Flatten the (batch, triangle) work list.

    Returns pos_flat [N, 4], batch [M], tri_id [M] (index into `tri`) and vidx [M, 3] (rows of pos_flat).
    """
    tri_l = tri.long()
    dev = pos.device
    if pos.ndim == 3:
        b, v = pos.shape[0], pos.shape[1]
        f = tri.shape[0]
        batch = torch.arange(b, device=dev).repeat_interleave(f)
        tri_id = torch.arange(f, device=dev).repeat(b)
        vidx = tri_l[tri_id] + (batch * v)[:, None]
        return pos.reshape(-1, 4), batch, tri_id, vidx
    assert ranges is not None
    starts, counts = ranges[:, 0].long().tolist(), ranges[:, 1].long().tolist()
    tri_id = torch.cat([torch.arange(s, s + c, device=dev) for s, c in zip(starts, counts)])
    batch = torch.repeat_interleave(torch.arange(len(starts), device=dev),
                                    torch.tensor(counts, device=dev))
    return pos, batch, tri_id, tri_l[tri_id]


# ----------------------------------------------------------------------------------------------
# Rasterize


def _edge_coefficients(p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """p [M, 3, 4] clip-space triangles -> A, B, C [M, 3] with a_i = C_i + A_i*fx + B_i*fy, det [M].

    Edge i is opposite vertex i. Coefficients of a shared edge are exact negatives in the two
    triangles, so adjacent triangles leave no cracks.
    """
    x, y, w = p[..., 0], p[..., 1], p[..., 3]                     # [M, 3]
    j = torch.tensor([1, 2, 0], device=p.device)
    k = torch.tensor([2, 0, 1], device=p.device)
    xj, yj, wj, xk, yk, wk = x[:, j], y[:, j], w[:, j], x[:, k], y[:, k], w[:, k]
    c = xj * yk - yj * xk
    a = yj * wk - wj * yk
    b = wj * xk - xj * wk
    det = (w * c).sum(-1)
    return a, b, c, det


def _pixel_bboxes(p: Tensor, width: int, height: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inclusive pixel-index bounding boxes [M] x4 of the triangles' sample coverage.

    Triangles with a vertex at w <= 0 project unboundedly: they get the whole image (the inside
    test still decides exactly).
    """
    w = p[..., 3]
    front = (w > 0).all(dim=1)
    safe_w = torch.where(w > 0, w, torch.ones_like(w))
    sx = (p[..., 0] / safe_w + 1.0) * (0.5 * width) - 0.5      # pixel-index space, [M, 3]
    sy = (p[..., 1] / safe_w + 1.0) * (0.5 * height) - 0.5
    # Small margin: the exact inside test runs afterwards, the box only has to be conservative.
    x0 = torch.ceil(sx.min(dim=1).values - 1e-3).clamp(0, width - 1)
    x1 = torch.floor(sx.max(dim=1).values + 1e-3).clamp(-1, width - 1)
    y0 = torch.ceil(sy.min(dim=1).values - 1e-3).clamp(0, height - 1)
    y1 = torch.floor(sy.max(dim=1).values + 1e-3).clamp(-1, height - 1)
    full = ~front
    x0 = torch.where(full, torch.zeros_like(x0), x0)
    y0 = torch.where(full, torch.zeros_like(y0), y0)
    x1 = torch.where(full, torch.full_like(x1, width - 1), x1)
    y1 = torch.where(full, torch.full_like(y1, height - 1), y1)
    return x0.long(), y0.long(), x1.long(), y1.long()


def _frustum_culled(p: Tensor) -> Tensor:
    """[M] True when all three vertices lie outside the same clip plane."""
    x, y, z, w = p.unbind(-1)
    outside = [x > w, x < -w, y > w, y < -w, z > w, z < -w]
    return torch.stack([o.all(dim=1) for o in outside]).any(dim=0)


def _visibility_keys(pos_flat: Tensor, batch: Tensor, tri_id: Tensor, vidx: Tensor, num_batch: int,
                     height: int, width: int, max_pairs: int) -> Tensor:
    """Z-buffer: [B*H*W] int64 keys (sortable z/w << 32 | triangle id), _KEY_EMPTY where empty."""
    dev = pos_flat.device
    keys = torch.full((num_batch * height * width,), _KEY_EMPTY, dtype=torch.int64, device=dev)
    p = pos_flat[vidx]                                             # [M, 3, 4]
    a, b, c, det = _edge_coefficients(p)
    keep = (~_frustum_culled(p)) & (det != 0) & torch.isfinite(det)
    x0, y0, x1, y1 = _pixel_bboxes(p, width, height)
    bw, bh = (x1 - x0 + 1).clamp(min=0), (y1 - y0 + 1).clamp(min=0)
    counts = torch.where(keep, bw * bh, torch.zeros_like(bw))
    sel = torch.nonzero(counts > 0).squeeze(1)
    if sel.numel() == 0:
        return keys
    # Per-item record gathered once per pair: A, B, C (3 each), z (3), det.
    record = torch.cat([a, b, c, p[..., 2], det[:, None]], dim=1)[sel]   # [S, 13]
    x0, y0, bw, counts = x0[sel], y0[sel], bw[sel], counts[sel]
    base_pix = (batch[sel] * (height * width)).long()
    tri_id = tri_id[sel]
    cum = torch.cumsum(counts, 0)
    # Chunk boundaries so that each chunk has at most ~max_pairs pairs (a single big item may exceed).
    starts = [0]
    total = int(cum[-1])
    while True:
        done = int(cum[starts[-1] - 1]) if starts[-1] > 0 else 0
        if done >= total:
            break
        nxt = int(torch.searchsorted(cum, torch.tensor(done + max_pairs, device=dev), right=True))
        starts.append(max(nxt, starts[-1] + 1))
    for s, e in zip(starts[:-1], starts[1:]):
        _rasterize_chunk(keys, record[s:e], x0[s:e], y0[s:e], bw[s:e], counts[s:e], base_pix[s:e],
                         tri_id[s:e], height, width)
    return keys


def _rasterize_chunk(keys: Tensor, record: Tensor, x0: Tensor, y0: Tensor, bw: Tensor, counts: Tensor,
                     base_pix: Tensor, tri_id: Tensor, height: int, width: int) -> None:
    dev = record.device
    n_items = counts.shape[0]
    item = torch.repeat_interleave(torch.arange(n_items, device=dev), counts)     # [P]
    first = torch.cumsum(counts, 0) - counts
    local = torch.arange(item.shape[0], device=dev) - first[item]
    px = x0[item] + local % bw[item]
    py = y0[item] + torch.div(local, bw[item], rounding_mode="floor")
    fx, fy = _pixel_centers(width, height, px, py)
    r = record[item]                                                              # [P, 13]
    edge = r[:, 6:9] + r[:, 0:3] * fx[:, None] + r[:, 3:6] * fy[:, None]          # [P, 3]
    det = r[:, 12]
    inside = ((edge * det[:, None]) >= 0).all(dim=1) & ((edge.sum(1) * det) > 0)
    zw = (r[:, 9:12] * edge).sum(1) / det
    inside &= (zw >= -1.0) & (zw <= 1.0)
    idx = torch.nonzero(inside).squeeze(1)
    if idx.numel() == 0:
        return
    key = (_sortable_float_key(zw[idx]) << 32) | tri_id[item[idx]]
    pix = base_pix[item[idx]] + py[idx] * width + px[idx]
    keys.scatter_reduce_(0, pix, key, reduce="amin")


def _barycentrics(p: Tensor, fx: Tensor, fy: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """nvdiffrast's per-pixel barycentric evaluation. p [N, 3, 4]; fx, fy [N].

    Returns a [N, 3] edge values, u [N], v [N], z/w [N], iw [N] (1 / sum a).
    """
    px = p[..., 0] - fx[:, None] * p[..., 3]
    py = p[..., 1] - fy[:, None] * p[..., 3]
    j, k = [1, 2, 0], [2, 0, 1]
    a = px[:, j] * py[:, k] - py[:, j] * px[:, k]                 # a0 = p1x*p2y - p1y*p2x, ...
    iw = 1.0 / a.sum(1)
    zw = (p[..., 2] * a).sum(1) / (p[..., 3] * a).sum(1)
    return a, a[:, 0] * iw, a[:, 1] * iw, zw, iw


def _clamp_straight_through(x: Tensor, lo: float, hi: float) -> Tensor:
    """Clamped value with the unclamped gradient (nvdiffrast saturates outputs, not gradients)."""
    return x + (x.clamp(lo, hi) - x).detach()


def rasterize(pos: Tensor, tri: Tensor, resolution: tuple[int, int], ranges: Tensor | None = None,
              grad_db: bool = True, max_pairs: int = DEFAULT_MAX_PAIRS) -> tuple[Tensor, Tensor]:
    """Rasterize; returns rast [B, H, W, 4] and rast_db [B, H, W, 4]. Inputs are validated by raster.py."""
    height, width = int(resolution[0]), int(resolution[1])
    num_batch = pos.shape[0] if pos.ndim == 3 else ranges.shape[0]
    pos_flat, batch, tri_id, vidx = _triangle_items(pos, tri, ranges)
    with torch.no_grad():
        keys = _visibility_keys(pos_flat.detach().float(), batch, tri_id, vidx, num_batch, height,
                                width, max_pairs)
    pix = torch.nonzero(keys != _KEY_EMPTY).squeeze(1)                          # [N] covered pixels
    win_tri = keys[pix] & 0xFFFFFFFF                                             # [N]
    pix_b = torch.div(pix, height * width, rounding_mode="floor")
    pix_y = torch.div(pix % (height * width), width, rounding_mode="floor")
    pix_x = pix % width
    fx, fy = _pixel_centers(width, height, pix_x, pix_y)
    rows = tri.long()[win_tri]                                                   # [N, 3]
    if pos.ndim == 3:
        rows = rows + (pix_b * pos.shape[1])[:, None]
    p = pos_flat[rows]                                                           # [N, 3, 4], differentiable
    a, u, v, zw, iw = _barycentrics(p, fx, fy)
    u = _clamp_straight_through(u, 0.0, 1.0)
    v = _clamp_straight_through(v, 0.0, 1.0)
    zw = zw.detach().clamp(-1.0, 1.0)                                            # depth carries no gradient
    tid = (win_tri + 1).to(torch.float32)
    vals = torch.stack([u, v, zw, tid], dim=1)
    rast = torch.zeros(num_batch * height * width, 4, dtype=torch.float32, device=pos.device)
    rast = rast.index_put((pix,), vals)

    if grad_db:
        db_vals = _bary_pixel_derivatives(p, u, v, iw, width, height)
    else:  # like nvdiffrast: no gradient from rast_db into pos
        with torch.no_grad():
            db_vals = _bary_pixel_derivatives(p, u, v, iw, width, height)
    rast_db = torch.zeros(num_batch * height * width, 4, dtype=torch.float32, device=pos.device)
    rast_db = rast_db.index_put((pix,), db_vals)
    shape = (num_batch, height, width, 4)
    return rast.reshape(shape), rast_db.reshape(shape)


def _bary_pixel_derivatives(p: Tensor, u: Tensor, v: Tensor, iw: Tensor, width: int, height: int) -> Tensor:
    """(du/dX, du/dY, dv/dX, dv/dY) [N, 4] per pixel step, nvdiffrast's closed form."""
    x, y, w = p[..., 0], p[..., 1], p[..., 3]
    j, k = [1, 2, 0], [2, 0, 1]
    da_dx = y[:, k] * w[:, j] - y[:, j] * w[:, k]                # [N, 3]
    da_dy = x[:, j] * w[:, k] - x[:, k] * w[:, j]
    dfx, dfy = (2.0 / width) * iw, (2.0 / height) * iw
    dat_dx, dat_dy = da_dx.sum(1), da_dy.sum(1)
    return torch.stack([dfx * (u * dat_dx - da_dx[:, 0]), dfy * (u * dat_dy - da_dy[:, 0]),
                        dfx * (v * dat_dx - da_dx[:, 1]), dfy * (v * dat_dy - da_dy[:, 1])], dim=1)


# ----------------------------------------------------------------------------------------------
# Interpolate


def _covered(rast: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices of covered pixels [N], their batch index [N] and triangle index [N]."""
    b, h, w, _ = rast.shape
    tid = rast[..., 3].detach().reshape(-1).long() - 1
    pix = torch.nonzero(tid >= 0).squeeze(1)
    return pix, torch.div(pix, h * w, rounding_mode="floor"), tid[pix]


def interpolate(attr: Tensor, rast: Tensor, tri: Tensor, rast_db: Tensor | None = None,
                diff_attrs: list[int] | None = None) -> tuple[Tensor, Tensor]:
    """out [B, H, W, C] = u*a0 + v*a1 + (1-u-v)*a2; out_db [B, H, W, 2*len(diff_attrs)] or [B, H, W, 0]."""
    b, h, w, _ = rast.shape
    attr3 = attr[None] if attr.ndim == 2 else attr                 # [Ba, V, C], Ba in {1, B}
    channels = attr3.shape[-1]
    pix, pix_b, tid = _covered(rast)
    rows = tri.long()[tid]                                          # [N, 3]
    ab = pix_b if attr3.shape[0] > 1 else torch.zeros_like(pix_b)
    a = attr3[ab[:, None], rows]                                    # [N, 3, C]
    r = rast.reshape(-1, 4)[pix]
    u, v = r[:, 0:1], r[:, 1:2]
    vals = u * a[:, 0] + v * a[:, 1] + (1.0 - u - v) * a[:, 2]
    out = torch.zeros(b * h * w, channels, dtype=vals.dtype, device=rast.device).index_put((pix,), vals)
    out = out.reshape(b, h, w, channels)
    if not diff_attrs:
        return out, torch.zeros(b, h, w, 0, dtype=out.dtype, device=rast.device)
    sel = torch.tensor(diff_attrs, device=rast.device, dtype=torch.long)
    db = rast_db.reshape(-1, 4)[pix]                                # [N, 4]
    d0 = (a[:, 0] - a[:, 2])[:, sel]                                # [N, D] d attr / du
    d1 = (a[:, 1] - a[:, 2])[:, sel]                                # [N, D] d attr / dv
    ddx = d0 * db[:, 0:1] + d1 * db[:, 2:3]
    ddy = d0 * db[:, 1:2] + d1 * db[:, 3:4]
    vals_db = torch.stack([ddx, ddy], dim=2).reshape(pix.shape[0], 2 * sel.shape[0])
    out_db = torch.zeros(b * h * w, vals_db.shape[1], dtype=vals_db.dtype, device=rast.device)
    out_db = out_db.index_put((pix,), vals_db).reshape(b, h, w, -1)
    return out, out_db


# ----------------------------------------------------------------------------------------------
# Antialias


def opposite_vertices(tri: Tensor, num_vertices: int) -> Tensor:
    """[F, 3] int64: for edge i of each triangle (the one opposite vertex i) the third vertex of the
    neighbouring triangle across it, or -1 when the edge has no neighbour (a silhouette candidate).

    Like nvdiffrast's edge hash, each edge keeps the first two distinct opposite vertices
    (first in triangle order), so non-manifold edges behave as there.
    """
    t = tri.long()
    f = t.shape[0]
    dev = t.device
    valid = (t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 2] != t[:, 0])
    va, vb = t[:, [1, 2, 0]], t[:, [2, 0, 1]]                       # edge i = (v[i+1], v[i+2])
    key = torch.minimum(va, vb) * num_vertices + torch.maximum(va, vb)   # [F, 3]
    flat_key = key.reshape(-1)
    flat_val = t.reshape(-1)
    flat_ok = valid[:, None].expand(f, 3).reshape(-1)
    ins = torch.nonzero(flat_ok).squeeze(1)
    if ins.numel() == 0:     # only degenerate triangles (e.g. an all-padding surface): no edges
        return torch.full((f, 3), -1, dtype=torch.long, device=dev)
    order = ins[torch.argsort(flat_key[ins], stable=True)]
    k_sorted, v_sorted = flat_key[order], flat_val[order]
    uniq, group = torch.unique_consecutive(k_sorted, return_inverse=True)
    n_groups = uniq.shape[0]
    pos_in = torch.arange(k_sorted.shape[0], device=dev)
    first_pos = torch.full((n_groups,), k_sorted.shape[0], device=dev, dtype=torch.long)
    first_pos = first_pos.scatter_reduce(0, group, pos_in, reduce="amin")
    slot1 = v_sorted[first_pos]
    differs = v_sorted != slot1[group]
    big = k_sorted.shape[0]
    second_pos = torch.full((n_groups,), big, device=dev, dtype=torch.long)
    second_pos = second_pos.scatter_reduce(0, group, torch.where(differs, pos_in, big), reduce="amin")
    slot2 = torch.where(second_pos < big, v_sorted[second_pos.clamp(max=max(big - 1, 0))],
                        torch.full_like(slot1, -1))
    # Look every (triangle, edge) up in its group.
    g_of = torch.searchsorted(uniq, flat_key).clamp(max=max(n_groups - 1, 0))
    s1, s2 = slot1[g_of], slot2[g_of]
    opp = torch.where(s1 == flat_val, s2, torch.where(s2 == flat_val, s1, torch.full_like(s1, -1)))
    opp = torch.where(flat_ok, opp, torch.full_like(opp, -1))
    return opp.reshape(f, 3)


def _discontinuities(rast: Tensor) -> tuple[Tensor, Tensor]:
    """Pixel pairs with different triangle ids: pixel0 flat index [K] and direction d [K] (1 = down)."""
    b, h, w, _ = rast.shape
    t = rast[..., 3].detach()
    idx = torch.arange(b * h * w, device=rast.device).reshape(b, h, w)
    right = idx[:, :, :-1][t[:, :, :-1] != t[:, :, 1:]]
    down = idx[:, :-1, :][t[:, :-1, :] != t[:, 1:, :]]
    pixel0 = torch.cat([right, down])
    d = torch.cat([torch.zeros_like(right), torch.ones_like(down)])
    return pixel0, d


def max_idx3(n: Sequence[Tensor], dd: Sequence[Tensor]) -> Tensor:
    """nvdiffrast's max_idx3 over rational numbers n_i / d_i (ties resolve to the lower index)."""
    def gt(n0: Tensor, n1: Tensor, d0: Tensor, d1: Tensor) -> Tensor:
        return (n0 * d1 > n1 * d0) == same_sign(d0, d1)

    g10 = gt(n[1], n[0], dd[1], dd[0])
    g20 = gt(n[2], n[0], dd[2], dd[0])
    g21 = gt(n[2], n[1], dd[2], dd[1])
    return torch.where(g20 & g21, 2, torch.where(g10, 1, 0))


def antialias(color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor,
              opposite: Tensor | None = None) -> Tensor:
    """Analytic silhouette antialiasing (nvdiffrast's algorithm); differentiable w.r.t. color and pos.

    For every horizontally/vertically adjacent pixel pair with different triangle ids, the nearer
    triangle (or the only one) is tested for a silhouette edge crossing the segment between the two
    pixel centres; if found at fraction dc, one pixel of the pair is blended towards the other by
    |0.5 - dc|. The blend weight depends on the projected edge, so autograd yields the vertex
    gradient nvdiffrast computes analytically.
    """
    b, h, w, c = color.shape
    num_v = pos.shape[-2]
    if opposite is None:
        opposite = opposite_vertices(tri, num_v)
    pixel0, d = _discontinuities(rast)
    out = color.reshape(-1, c)
    if pixel0.numel() == 0:
        return color.clone()
    pixel1 = pixel0 + torch.where(d == 1, w, 1)
    r = rast.detach().reshape(-1, 4)
    tri0 = r[pixel0, 3].long() - 1
    tri1 = r[pixel1, 3].long() - 1
    z0, z1 = r[pixel0, 2], r[pixel1, 2]
    use1 = (tri0 < 0) | ((tri1 >= 0) & ~(z0 < z1))                   # chose the neighbour's triangle
    sel_tri = torch.where(use1, tri1, tri0)
    pb = torch.div(pixel0, h * w, rounding_mode="floor")
    px = pixel0 % w + torch.where(use1 & (d == 0), 1, 0)
    py = torch.div(pixel0 % (h * w), w, rounding_mode="floor") + torch.where(use1 & (d == 1), 1, 0)

    t_l = tri.long()
    vi = t_l[sel_tri]                                                 # [K, 3]
    op = opposite[sel_tri]                                            # [K, 3]
    op = torch.where(op >= 0, op, vi)                                 # no neighbour: always silhouette
    pos_flat = pos.reshape(-1, 4)
    if pos.ndim == 3:
        vi = vi + (pb * num_v)[:, None]
        op = op + (pb * num_v)[:, None]
    p = pos_flat[vi]                                                  # [K, 3, 4] differentiable
    o = pos_flat[op].detach()                                         # only used for sign tests
    ok = (p[..., 3].detach() > 0).all(1) & (o[..., 3] > 0).all(1)    # w <= 0 cannot be projected
    safe = lambda t: torch.where(ok[:, None], t, torch.ones_like(t))  # noqa: E731
    xh, yh = 0.5 * w, 0.5 * h
    fx = (px.to(torch.float32) + 0.5 - xh)[:, None]
    fy = (py.to(torch.float32) + 0.5 - yh)[:, None]
    x = p[..., 0] / safe(p[..., 3]) * xh - fx                         # [K, 3] pixel space, rel. to centre
    y = p[..., 1] / safe(p[..., 3]) * yh - fy
    ox = o[..., 0] / safe(o[..., 3]) * xh - fx
    oy = o[..., 1] / safe(o[..., 3]) * yh - fy

    xd, yd = x.detach(), y.detach()
    bb = (xd[:, 1] - xd[:, 0]) * (yd[:, 2] - yd[:, 0]) - (xd[:, 2] - xd[:, 0]) * (yd[:, 1] - yd[:, 0])
    wing = []
    for i, (j, k) in enumerate([(1, 2), (2, 0), (0, 1)]):             # wing i: edge (j, k) seen from op i
        wing.append((xd[:, j] - ox[:, i]) * (yd[:, k] - oy[:, i]) - (xd[:, k] - ox[:, i]) * (yd[:, j] - oy[:, i]))
    sil = [same_sign(a, bb) for a in wing]                           # edge i is a silhouette edge

    # Work in a frame where the pixel pair is horizontal (swap x/y for vertical pairs).
    down = (d == 1)[:, None]
    x, y = torch.where(down, y, x), torch.where(down, x, y)
    ds = torch.where(use1, -1.0, 1.0)
    dx = [x[:, 2] - x[:, 1], x[:, 0] - x[:, 2], x[:, 1] - x[:, 0]]
    dy = [y[:, 2] - y[:, 1], y[:, 0] - y[:, 2], y[:, 1] - y[:, 0]]
    dn = [ds * (x[:, 1] * dy[0] - y[:, 1] * dx[0]), ds * (x[:, 2] * dy[1] - y[:, 2] * dx[1]),
          ds * (x[:, 0] * dy[2] - y[:, 0] * dx[2])]
    yds = y.detach()
    no_cross = [same_sign(yds[:, 1], yds[:, 2]), same_sign(yds[:, 2], yds[:, 0]),
                same_sign(yds[:, 0], yds[:, 1])]                     # edge does not cross the pair's line
    n_sel = [torch.where(nc, torch.full_like(v, -_F32_MAX), v.detach()) for nc, v in zip(no_cross, dn)]
    d_sel = [torch.where(nc, torch.ones_like(v), v.detach()) for nc, v in zip(no_cross, dy)]
    di = max_idx3(n_sel, d_sel)

    dc = torch.full_like(ds, -_F32_MAX)
    for i in range(3):
        use = (di == i) & sil[i] & (dy[i].detach().abs() >= dx[i].detach().abs()) & ~no_cross[i]
        denom = torch.where(use, dy[i], torch.ones_like(dy[i]))
        dc = torch.where(use, dn[i] / denom, dc)
    eps = 0.0625                                                      # <= 1/16 pixel inaccuracy
    hit = ok & cond_any(sil) & (dc.detach() > -eps) & (dc.detach() < 1.0 + eps)
    idx = torch.nonzero(hit).squeeze(1)
    if idx.numel() == 0:
        return color.clone()
    dc = dc[idx].clamp(0.0, 1.0)
    alpha = ds[idx] * (0.5 - dc)                                      # [K']
    p0, p1 = pixel0[idx], pixel1[idx]
    c0, c1 = out[p0], out[p1]
    target = torch.where(alpha.detach() > 0, p0, p1)
    out = out.index_add(0, target, alpha[:, None] * (c1 - c0))
    return out.reshape(b, h, w, c)


def cond_any(masks: list[Tensor]) -> Tensor:
    return masks[0] | masks[1] | masks[2]
