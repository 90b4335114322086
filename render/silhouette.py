"""Silhouette antialiasing that walks the mesh to find the silhouette edge ("walk").

nvdiffrast's antialias ("pixel") looks at every horizontally or vertically adjacent pixel pair
whose triangle ids differ and tests only the triangle under the nearer pixel's centre for a
silhouette edge between the two centres. Where triangles are smaller than a pixel or two (fine
meshes, DMTet surfaces, and any surface near its silhouette, where triangles are seen edge-on) the
silhouette edge belongs to another triangle: the pair is skipped, and its silhouette gradient is
lost. The walk follows the segment from the foreground pixel's centre towards the other centre
over the foreground triangle and its neighbours, and blends with the first silhouette edge it
crosses, with nvdiffrast's blend formula.

Two parts:
- `find_silhouette_edges` (discrete, no gradient): per pixel pair, the silhouette edge's two
  vertex ids, or -1. Kernels: "torch" (the reference, any device) and "triton"
  (render/silhouette_triton.py: CUDA, or CPU under TRITON_INTERPRET=1); "auto" is triton on
  CUDA when it imports, else torch. A kernel named explicitly that cannot run is an error.
- `blend_silhouettes` (differentiable): nvdiffrast's blend from the recorded edges, so autograd
  gives the colour and vertex gradients.

On CUDA every step is fixed-size over all pixel pairs with masks (no host synchronisation, no
data-dependent shapes), so it can be captured in a CUDA graph (render/cuda_graph.py). On the CPU
the reference compacts to the pairs still walking (the fixed-size path would run all MAX_STEPS
steps over every pair of the image).

Conventions are nvdiffrast's (render/raster.py): `pos` clip space [B, V, 4] (instanced) or
[V, 4] (range mode), `tri [F, 3]` int32, `rast [B, H, W, 4]` = (u, v, z/w, triangle id + 1).
Pixel pairs are indexed [2, B, H, W]: direction 0 pairs pixel (x, y) with (x + 1, y), direction
1 pairs it with (x, y + 1); pairs leaving the image are never used.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
from torch import Tensor

from render.raster_torch import max_idx3, same_sign
from render.util import check_tensor, triton_interpreter_active

# The Triton walk is GPU software that CPU machines often lack; the reason is kept for the error a
# request for kernel="triton" raises (never a silent fallback). Importing it fixes its compiled or
# interpreted mode from TRITON_INTERPRET.
try:
    from render.silhouette_triton import find_silhouette_edges_triton
except ImportError as _err:
    find_silhouette_edges_triton = None
    _TRITON_MISSING: str | None = f"triton is not importable ({_err})"
else:
    _TRITON_MISSING = None

KERNELS = ("auto", "torch", "triton")
# Tolerance on the crossing distance, in pixels (nvdiffrast's: "no more than 1/16 pixel inaccuracy").
EPS = 0.0625
# Triangles one walk may visit, the foreground triangle included. A walk covers at most one pixel,
# but towards a silhouette the surface turns edge-on and one pixel of screen distance spans many
# foreshortened triangles (for a smooth surface of screen radius R pixels, ~sqrt(2 R) pixels of
# surface). The longest walks that found an edge: 9 triangles on an icosphere of 20,480 faces at
# 256^2, 16 on one of 81,920 faces, 22 on a DMTet grid-256 surface at 512^2 and 32 on the same at
# 256^2 (docs/results/silhouette/README.md); 64 doubles the worst. A walk that runs out records no
# edge: its pair keeps its colours, as with nvdiffrast's antialias.
MAX_STEPS = 64
_F32_MAX = 3.402823466e38


class SilhouetteInputError(ValueError):
    """An argument to the silhouette functions has the wrong type, shape, dtype or device."""


class SilhouetteBackendError(RuntimeError):
    """The requested walk kernel cannot run here (the message says why)."""


class SilhouetteTopology(NamedTuple):
    """Edge neighbours of a triangle mesh, built once per mesh by `silhouette_topology`.

    Edge i of a triangle is the one opposite its vertex i: (v[i+1], v[i+2]).
    neighbour_fx3:      int32 [F, 3], the triangle across edge i, -1 where there is none (a border,
                        a degenerate triangle, or a third face on a non-manifold edge).
    neighbour_edge_fx3: int32 [F, 3], the index of that edge in the neighbour (so the neighbour's
                        vertex opposite the shared edge is tri[neighbour, neighbour_edge]); -1
                        where there is no neighbour.
    """
    neighbour_fx3: Tensor
    neighbour_edge_fx3: Tensor


# ----------------------------------------------------------------------------------------------
# Validation


# Every input check of this module raises SilhouetteInputError.
_check_tensor = functools.partial(check_tensor, error=SilhouetteInputError)


def _check_tri(tri_fx3: object, device: torch.device | None) -> None:
    _check_tensor("tri_fx3", tri_fx3, torch.int32, device)
    if tri_fx3.ndim != 2 or tri_fx3.shape[1] != 3:
        raise SilhouetteInputError(f"tri_fx3: expected shape [F, 3], got {tuple(tri_fx3.shape)}")


def _check_walk_inputs(rast: object, pos: object, tri: object, topology: object) -> None:
    _check_tensor("rast_bxhxwx4", rast, torch.float32, None)
    if rast.ndim != 4 or rast.shape[-1] != 4:
        raise SilhouetteInputError(f"rast_bxhxwx4: expected shape [B, H, W, 4], got {tuple(rast.shape)}")
    _check_tensor("pos", pos, torch.float32, rast.device)
    if pos.ndim not in (2, 3) or pos.shape[-1] != 4 or (pos.ndim == 3 and pos.shape[0] != rast.shape[0]):
        raise SilhouetteInputError(f"pos: expected [B={rast.shape[0]}, V, 4] or [V, 4] clip-space positions, "
                                   f"got {tuple(pos.shape)}")
    _check_tri(tri, rast.device)
    if not isinstance(topology, SilhouetteTopology):
        raise SilhouetteInputError(f"topology: expected a SilhouetteTopology from silhouette_topology(), "
                                   f"got {type(topology).__name__}")
    for name, t in zip(topology._fields, topology):
        _check_tensor(f"topology.{name}", t, torch.int32, rast.device)
        if t.shape != tri.shape:
            raise SilhouetteInputError(f"topology.{name}: expected shape {tuple(tri.shape)} (that of tri_fx3), "
                                       f"got {tuple(t.shape)}")


def _check_edges(edges: object, rast: Tensor) -> None:
    _check_tensor("edges_2xbxhxwx2", edges, torch.int32, rast.device)
    expected = (2, *rast.shape[:3], 2)
    if tuple(edges.shape) != expected:
        raise SilhouetteInputError(f"edges_2xbxhxwx2: expected shape {expected} (from find_silhouette_edges "
                                   f"on this rast), got {tuple(edges.shape)}")


def walk_kernel(kernel: str, device: torch.device) -> str:
    """The walk kernel that runs for `kernel` on `device`: "torch" or "triton".

    "auto": triton on CUDA when it imports, else torch. "triton" where triton is missing, or on
    the CPU without TRITON_INTERPRET=1, raises SilhouetteBackendError.
    """
    if kernel not in KERNELS:
        raise SilhouetteInputError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "triton" if device.type == "cuda" and _TRITON_MISSING is None else "torch"
    if kernel == "triton":
        if _TRITON_MISSING is not None:
            raise SilhouetteBackendError(f"walk kernel 'triton' requested but {_TRITON_MISSING}; use kernel='torch'")
        if device.type != "cuda" and not triton_interpreter_active():
            raise SilhouetteBackendError(f"walk kernel 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for "
                                         f"CPU testing), got device {device}; use kernel='torch'")
    return kernel


# ----------------------------------------------------------------------------------------------
# Topology


def silhouette_topology(tri_fx3: Tensor, num_vertices: int) -> SilhouetteTopology:
    """Edge neighbours of `tri_fx3` (int32 [F, 3], vertex ids < num_vertices); see SilhouetteTopology.

    Like nvdiffrast's edge hash (and raster_torch.opposite_vertices), an edge keeps the first two
    faces (in face order) with distinct opposite vertices; faces with a repeated vertex have no
    edges. Fixed-size ops only (a sort and scans, no host synchronisation), so it can be built
    inside a CUDA graph capture.
    """
    _check_tri(tri_fx3, None)
    if not isinstance(num_vertices, int) or num_vertices < 0:
        raise SilhouetteInputError(f"num_vertices: expected a non-negative int, got {num_vertices!r}")
    t = tri_fx3.long()
    f, dev = t.shape[0], t.device
    m = 3 * f
    if f == 0:
        empty = torch.empty(0, 3, dtype=torch.int32, device=dev)
        return SilhouetteTopology(empty, empty.clone())
    valid = (t[:, 0] != t[:, 1]) & (t[:, 1] != t[:, 2]) & (t[:, 2] != t[:, 0])       # [F]
    # edge i = (v[i+1], v[i+2]); rolls, not list indexing, whose host index tensor a graph capture refuses
    va, vb = t.roll(-1, 1), t.roll(1, 1)
    n = max(num_vertices, 1)
    key = (torch.minimum(va, vb) * n + torch.maximum(va, vb)).reshape(-1)             # [3F] undirected edge
    slot = torch.arange(m, device=dev)                                                # (face, edge) = 3 f + i
    # Edges of degenerate faces get keys of their own past every real edge: groups of one, no neighbour.
    key = torch.where(valid[:, None].expand(f, 3).reshape(-1), key, n * n + slot)
    order = torch.sort(key, stable=True).indices                                      # [3F] slots by edge
    k_sorted = key[order]
    own_opp = t.reshape(-1)[order]                    # each slot's opposite vertex = vertex i of its face
    is_start = torch.ones(m, dtype=torch.bool, device=dev)
    is_start[1:] = k_sorted[1:] != k_sorted[:-1]
    # Position (in sorted order) of each slot's group start: a running maximum, no group ids needed.
    start = torch.cummax(torch.where(is_start, slot, 0), 0).values                    # [3F]
    first_opp = own_opp[start]
    # The group's second slot: its first one whose opposite vertex differs from the first slot's.
    second = torch.full((m,), m, dtype=torch.long, device=dev)
    second = second.scatter_reduce(0, start, torch.where(own_opp != first_opp, slot, m), reduce="amin")
    second = second[start]
    has_second = second < m
    second_opp = own_opp[second.clamp(max=m - 1)]
    # A slot whose opposite vertex is the first one's sees the second slot's face, and vice versa;
    # a third face on a non-manifold edge sees none.
    across = torch.where(own_opp == first_opp, second, torch.where(has_second & (own_opp == second_opp), start, m))
    across = torch.where(has_second, across, m)
    found = across < m
    other = order[across.clamp(max=m - 1)]                                            # slot 3 f' + i' of the neighbour
    nbr_sorted = torch.where(found, torch.div(other, 3, rounding_mode="floor"), -1)
    edge_sorted = torch.where(found, other % 3, -1)
    neighbour = torch.empty(m, dtype=torch.int32, device=dev).scatter_(0, order, nbr_sorted.to(torch.int32))
    edge = torch.empty(m, dtype=torch.int32, device=dev).scatter_(0, order, edge_sorted.to(torch.int32))
    return SilhouetteTopology(neighbour.reshape(f, 3), edge.reshape(f, 3))


# ----------------------------------------------------------------------------------------------
# The walk (PyTorch reference)


def screen_positions(pos: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """Clip-space positions [B, V, 4] or [V, 4] -> (pixel-space x, y [N, 2] relative to the image
    centre, flattened over the batch; in front of the camera (w > 0) [N] bool). No gradient."""
    p = pos.detach().reshape(-1, 4)
    w = p[:, 3]
    front = w > 0
    safe_w = torch.where(front, w, torch.ones_like(w))
    # The expression order of raster_torch.antialias (x / w * xh), so walked edges are bit-equal.
    sxy = torch.stack([p[:, 0] / safe_w * (0.5 * width), p[:, 1] / safe_w * (0.5 * height)], dim=1)
    return sxy, front


class _Lanes(NamedTuple):
    """Per pixel pair being walked (all [L])."""
    pair: Tensor      # int64 index into the [2, B, H, W] pairs
    cur: Tensor       # int64 current triangle
    entry: Tensor     # int64 edge of `cur` the walk came in through, -1 in the foreground triangle
    fx: Tensor        # float32 foreground pixel centre, pixel space relative to the image centre
    fy: Tensor
    down: Tensor      # bool: a vertical pair (the walk swaps x and y, as nvdiffrast)
    ds: Tensor        # float32 +1: the foreground pixel is the pair's first, -1: its second
    vbase: Tensor     # int64 row of vertex 0 of this pair's image in the flattened positions


def _start_lanes(rast: Tensor, pair: Tensor, v_stride: int) -> tuple[_Lanes, Tensor, Tensor]:
    """The walks of the pairs `pair` [L] (indices into [2, B, H, W]), their foreground triangle
    [L] (nvdiffrast's choice: the nearer one, or the only one) and whether the pair lies in the
    image with different triangle ids [L]."""
    b, h, w, _ = rast.shape
    n = b * h * w
    r = rast.detach().reshape(n, 4)
    d = torch.div(pair, n, rounding_mode="floor")
    pixel0 = pair - d * n
    x = pixel0 % w
    y = torch.div(pixel0, w, rounding_mode="floor") % h
    bi = torch.div(pixel0, h * w, rounding_mode="floor")
    down = d == 1
    inside = torch.where(down, y < h - 1, x < w - 1)
    pixel1 = torch.where(inside, pixel0 + torch.where(down, w, 1), pixel0)
    t0, t1 = r[pixel0, 3], r[pixel1, 3]
    tri0, tri1 = t0.long() - 1, t1.long() - 1
    use1 = (tri0 < 0) | ((tri1 >= 0) & ~(r[pixel0, 2] < r[pixel1, 2]))
    fg = torch.where(use1, tri1, tri0)
    px = x + torch.where(use1 & ~down, 1, 0)
    py = y + torch.where(use1 & down, 1, 0)
    fx = px.to(torch.float32) + 0.5 - 0.5 * w
    fy = py.to(torch.float32) + 0.5 - 0.5 * h
    ds = torch.where(use1, -1.0, 1.0).to(torch.float32)
    lanes = _Lanes(pair, fg, torch.full_like(pair, -1), fx, fy, down, ds, bi * v_stride)
    return lanes, fg, inside & (t0 != t1)


def _pick(t: Tensor, i: Tensor) -> Tensor:
    """t [L, 3], i [L] -> t[l, i[l]]."""
    return t.gather(1, i[:, None]).squeeze(1)


def _walk_step(lanes: _Lanes, table: Tensor, tri_flat: Tensor, sxy: Tensor, front: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One triangle of each walk: (record [L] bool, edge vertex a [L], b [L], step on [L] bool,
    next triangle [L], its entry edge [L]). Mirrors nvdiffrast's analysis of one triangle, op for
    op (so that the first triangle's edge is bit for bit the one raster_torch.antialias tests).
    table [F, 9] int64: each triangle's vertices, neighbours and neighbour edges; tri_flat [3F]."""
    n_lanes = lanes.cur.shape[0]
    rec = table.index_select(0, lanes.cur)                                # [L, 9]
    vi, nb, ne = rec[:, 0:3], rec[:, 3:6], rec[:, 6:9]                    # [L, 3] each
    # Wing vertices: the neighbour's vertex across each edge; the triangle's own vertex where there
    # is no neighbour, which makes the edge a silhouette (as nvdiffrast).
    ov = torch.where(nb >= 0, tri_flat[(nb * 3 + ne).clamp(min=0)], vi)
    # Vertices v0 v1 v2 v0 v1, then the wings: columns 1:4 and 2:5 are each edge's ends (edge i
    # runs from v[i+1] to v[i+2]) as views.
    local = torch.cat([vi, vi[:, :2], ov], 1)                             # [L, 8]
    rows = local + lanes.vbase[:, None]
    ok = front[rows].all(1)                                               # w <= 0 cannot be projected
    xy = sxy.index_select(0, rows.reshape(-1)).view(n_lanes, 8, 2)
    x = xy[..., 0] - lanes.fx[:, None]                                    # [L, 8] relative to the centre
    y = xy[..., 1] - lanes.fy[:, None]
    x0, x1, x2, y0, y1, y2 = x[:, 0], x[:, 1], x[:, 2], y[:, 0], y[:, 1], y[:, 2]
    bb = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)                   # the triangle's orientation
    xj, xk, ox, yj, yk, oy = x[:, 1:4], x[:, 2:5], x[:, 5:8], y[:, 1:4], y[:, 2:5], y[:, 5:8]
    wing = (xj - ox) * (yk - oy) - (xk - ox) * (yj - oy)                  # [L, 3]
    # A silhouette edge: the wing vertex lies on the triangle's side of it (the surface folds back).
    sil = same_sign(wing, bb[:, None])

    # In a frame where the pair is horizontal: the segment runs along x from the foreground
    # centre (x = 0) to the other one (x = ds); an edge crosses its line where its ends' y differ
    # in sign, at x = dn / dy, i.e. at distance dn / dy from the foreground centre towards the other.
    down = lanes.down[:, None]
    xj, yj = torch.where(down, yj, xj), torch.where(down, xj, yj)
    xk, yk = torch.where(down, yk, xk), torch.where(down, xk, yk)
    dx, dy = xk - xj, yk - yj
    dn = lanes.ds[:, None] * (xj * dy - yj * dx)
    # The edge the walk came in through is never its exit (a segment through a vertex ties there).
    no_cross = same_sign(yj, yk) | (lanes.entry[:, None] == torch.arange(3, device=yj.device))
    n_sel = torch.where(no_cross, -_F32_MAX, dn)
    d_sel = torch.where(no_cross, 1.0, dy)
    e = max_idx3(n_sel.unbind(1), d_sel.unbind(1))                       # the exit edge: largest crossing
    crosses = ~_pick(no_cross, e)
    dy_e, dx_e = _pick(dy, e), _pick(dx, e)
    t = _pick(dn, e) / torch.where(crosses, dy_e, 1.0)
    # Past 1 + EPS the other centre lies inside this triangle: no silhouette between the two.
    leaves = ok & crosses & (t < 1.0 + EPS)
    sil_e = _pick(sil, e)
    # Each silhouette edge contributes once: horizontal pairs take edges more vertical than horizontal.
    record = leaves & sil_e & (dy_e.abs() >= dx_e.abs()) & (t > -EPS)
    nb_e = _pick(nb, e)
    step_on = leaves & ~sil_e & (nb_e >= 0)
    return record, _pick(local[:, 1:4], e), _pick(local[:, 2:5], e), step_on, nb_e, _pick(ne, e)


def _discontinuities(rast: Tensor) -> Tensor:
    """[K] int64 indices into the [2, B, H, W] pairs whose triangle ids differ (CPU compaction)."""
    b, h, w, _ = rast.shape
    t = rast[..., 3].detach()
    right = torch.zeros(b, h, w, dtype=torch.bool, device=rast.device)
    down = torch.zeros_like(right)
    right[:, :, :-1] = t[:, :, :-1] != t[:, :, 1:]
    down[:, :-1, :] = t[:, :-1, :] != t[:, 1:, :]
    return torch.nonzero(torch.cat([right.reshape(-1), down.reshape(-1)])).squeeze(1)


def _walk_torch(rast: Tensor, pos: Tensor, tri: Tensor, topology: SilhouetteTopology, max_steps: int,
                compact: bool) -> Tensor:
    """[2, B, H, W, 2] int32 silhouette edges (-1: none). compact=False: every step runs over all
    pairs with masks (fixed shapes, CUDA-graph safe); True: over the pairs still walking."""
    b, h, w, _ = rast.shape
    n_pairs = 2 * b * h * w
    dev = rast.device
    v_stride = pos.shape[1] if pos.ndim == 3 else 0
    sxy, front = screen_positions(pos, h, w)
    tri_l = tri.long()
    table = torch.cat([tri_l, topology.neighbour_fx3.long(), topology.neighbour_edge_fx3.long()], 1)   # [F, 9]
    tri_flat = tri_l.reshape(-1)
    out = torch.full((n_pairs, 2), -1, dtype=torch.int32, device=dev)
    pairs = _discontinuities(rast) if compact else torch.arange(n_pairs, device=dev)
    lanes, fg, differs = _start_lanes(rast, pairs, v_stride)
    active = differs & (fg >= 0) & (fg < tri.shape[0])       # an id past the mesh: a corrupt rast, skipped
    if compact:
        keep = torch.nonzero(active).squeeze(1)
        lanes = _Lanes(*(f.index_select(0, keep) for f in lanes))
    else:
        lanes = lanes._replace(cur=torch.where(active, fg, 0))
    for _ in range(max_steps):
        if compact and lanes.pair.numel() == 0:
            break
        record, va, vb, step_on, nxt, entry = _walk_step(lanes, table, tri_flat, sxy, front)
        edge = torch.stack([va, vb], 1).to(torch.int32)
        if compact:
            hit = torch.nonzero(record).squeeze(1)
            out[lanes.pair.index_select(0, hit)] = edge.index_select(0, hit)
            keep = torch.nonzero(step_on).squeeze(1)
            lanes = _Lanes(*(f.index_select(0, keep) for f in lanes._replace(cur=nxt, entry=entry)))
        else:
            out = torch.where((record & active)[:, None], edge, out)
            active = active & step_on
            lanes = lanes._replace(cur=torch.where(active, nxt, 0), entry=torch.where(active, entry, -1))
    return out.reshape(2, b, h, w, 2)


def find_silhouette_edges(rast_bxhxwx4: Tensor, pos: Tensor, tri_fx3: Tensor, topology: SilhouetteTopology, *,
                          kernel: str = "auto", max_steps: int = MAX_STEPS) -> Tensor:
    """The silhouette edge of every pixel pair: int32 [2, B, H, W, 2] vertex ids (a, b) into `pos`'s
    vertices (per image in instanced mode), -1 where the pair has none. No gradient.

    rast_bxhxwx4: the rasterizer's output; pos: the clip-space positions given to it ([B, V, 4] or
    [V, 4]); topology: silhouette_topology(tri_fx3, V); max_steps: triangles a walk may visit (1:
    the foreground triangle only, which is nvdiffrast's antialias). Where the walk crosses one of
    the foreground triangle's own edges, the edge is the one nvdiffrast's antialias blends with.
    """
    _check_walk_inputs(rast_bxhxwx4, pos, tri_fx3, topology)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise SilhouetteInputError(f"max_steps: expected an int >= 1, got {max_steps!r}")
    chosen = walk_kernel(kernel, rast_bxhxwx4.device)
    if chosen == "triton":
        b, h, w, _ = rast_bxhxwx4.shape
        sxy, front = screen_positions(pos, h, w)
        v_stride = pos.shape[1] if pos.ndim == 3 else 0
        return find_silhouette_edges_triton(rast_bxhxwx4.detach().contiguous(), sxy, front, tri_fx3.contiguous(),
                                            topology.neighbour_fx3.contiguous(),
                                            topology.neighbour_edge_fx3.contiguous(), v_stride, max_steps, EPS)
    return _walk_torch(rast_bxhxwx4, pos, tri_fx3, topology, max_steps, compact=rast_bxhxwx4.device.type == "cpu")


# ----------------------------------------------------------------------------------------------
# The differentiable blend


def _blend(color: Tensor, rast: Tensor, pos: Tensor, edges: Tensor, lanes: Tensor | None) -> Tensor:
    """nvdiffrast's blend for the pairs `lanes` [K] (indices into [2, B, H, W], all with an edge),
    or for every pair with masks when None (fixed shapes)."""
    b, h, w, c = color.shape
    n = b * h * w
    dev = color.device
    v_stride = pos.shape[1] if pos.ndim == 3 else 0
    pair = torch.arange(2 * n, device=dev) if lanes is None else lanes
    ev = edges.reshape(-1, 2)[pair].long()                               # [K, 2]
    has = ev[:, 0] >= 0
    start, _, _ = _start_lanes(rast, pair, v_stride)
    pixel0 = pair % n
    pixel1 = torch.where(has, pixel0 + torch.where(start.down, w, 1), pixel0)
    # Pairs without an edge read a placeholder row, spread over the vertices: their (zero) gradients
    # are still scattered back, and two million of them on one row serialize on its atomic adds
    # (the blend's backward took 286 ms at batch 4, 512^2 on an H100 with one shared row).
    placeholder = (pair % pos.shape[-2])[:, None]
    rows = torch.where(has[:, None], ev, placeholder) + start.vbase[:, None]
    # Pairs without an edge compute on a constant (their blend is masked out below), so that their
    # zero gradients stay finite whatever vertex their placeholder row holds.
    p = torch.where(has[:, None, None], pos.reshape(-1, 4)[rows], 1.0)   # [K, 2, 4] differentiable
    # The walk saw this edge's ends in front of the camera (w > 0); the expressions of
    # raster_torch.antialias, so the crossing is the one the walk tested.
    x = p[..., 0] / p[..., 3] * (0.5 * w) - start.fx[:, None]
    y = p[..., 1] / p[..., 3] * (0.5 * h) - start.fy[:, None]
    down = start.down[:, None]
    x, y = torch.where(down, y, x), torch.where(down, x, y)
    dx = x[:, 1] - x[:, 0]
    dy = y[:, 1] - y[:, 0]
    dn = start.ds * (x[:, 0] * dy - y[:, 0] * dx)
    dc = (dn / torch.where(has, dy, torch.ones_like(dy))).clamp(0.0, 1.0)   # crossing, pixels from the foreground
    alpha = start.ds * (0.5 - dc)                                        # [K]
    out = color.reshape(-1, c)
    c0, c1 = out[pixel0], out[pixel1]
    # The pixel on the wrong side of the edge moves towards the other's colour by |alpha|.
    target = torch.where(alpha.detach() > 0, pixel0, pixel1)
    delta = alpha[:, None] * (c1 - c0)
    if lanes is None:
        delta = torch.where(has[:, None], delta, torch.zeros_like(delta))
    return out.index_add(0, target, delta).reshape(b, h, w, c)


def blend_silhouettes(color_bxhxwxc: Tensor, rast_bxhxwx4: Tensor, pos: Tensor, edges_2xbxhxwx2: Tensor) -> Tensor:
    """Antialiased colours [B, H, W, C] from the edges of find_silhouette_edges; differentiable with
    respect to `color_bxhxwxc` and `pos` (the crossing point moves with the edge's projected ends).

    For a pair with an edge crossing the segment between the centres at distance dc (pixels, from
    the foreground centre, clamped to [0, 1]), alpha = ds (0.5 - dc), ds = +1 when the foreground
    pixel is the pair's first; the pixel on the wrong side of the edge (the first if alpha > 0)
    moves towards the other's colour by |alpha|: nvdiffrast's formula.
    """
    _check_tensor("rast_bxhxwx4", rast_bxhxwx4, torch.float32, None)
    if rast_bxhxwx4.ndim != 4 or rast_bxhxwx4.shape[-1] != 4:
        raise SilhouetteInputError(f"rast_bxhxwx4: expected shape [B, H, W, 4], got {tuple(rast_bxhxwx4.shape)}")
    _check_tensor("color_bxhxwxc", color_bxhxwxc, torch.float32, rast_bxhxwx4.device)
    if color_bxhxwxc.ndim != 4 or color_bxhxwxc.shape[:3] != rast_bxhxwx4.shape[:3]:
        raise SilhouetteInputError(f"color_bxhxwxc: expected [B, H, W, C] with [B, H, W] = "
                                   f"{tuple(rast_bxhxwx4.shape[:3])}, got {tuple(color_bxhxwxc.shape)}")
    _check_tensor("pos", pos, torch.float32, rast_bxhxwx4.device)
    if pos.ndim not in (2, 3) or pos.shape[-1] != 4 or (pos.ndim == 3 and pos.shape[0] != rast_bxhxwx4.shape[0]):
        raise SilhouetteInputError(f"pos: expected [B={rast_bxhxwx4.shape[0]}, V, 4] or [V, 4] clip-space "
                                   f"positions, got {tuple(pos.shape)}")
    _check_edges(edges_2xbxhxwx2, rast_bxhxwx4)
    if rast_bxhxwx4.device.type == "cpu":     # few pairs have an edge: blend only those
        lanes = torch.nonzero(edges_2xbxhxwx2[..., 0].reshape(-1) >= 0).squeeze(1)
        if lanes.numel() == 0:
            return color_bxhxwxc.clone()
        return _blend(color_bxhxwxc, rast_bxhxwx4, pos, edges_2xbxhxwx2, lanes)
    return _blend(color_bxhxwxc, rast_bxhxwx4, pos, edges_2xbxhxwx2, None)


def antialias_walk(color_bxhxwxc: Tensor, rast_bxhxwx4: Tensor, pos: Tensor, tri_fx3: Tensor,
                   topology: SilhouetteTopology | None = None, *, kernel: str = "auto") -> Tensor:
    """Silhouette antialiasing with the walk: find_silhouette_edges, then blend_silhouettes.
    `topology`: silhouette_topology(tri_fx3, V), built here when None."""
    if topology is None:
        _check_tensor("pos", pos, torch.float32, None)
        topology = silhouette_topology(tri_fx3, pos.shape[-2])
    edges = find_silhouette_edges(rast_bxhxwx4, pos, tri_fx3, topology, kernel=kernel)
    return blend_silhouettes(color_bxhxwxc, rast_bxhxwx4, pos, edges)
