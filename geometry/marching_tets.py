"""Marching tetrahedra: the sdf = 0 surface of a tet grid, exact or in fixed-size buffers.

Sign convention: sdf < 0 is inside the surface, sdf >= 0 outside. Extracted triangles are wound
counter-clockwise seen from outside, i.e. their normals (v1 - v0) x (v2 - v0) point outward.

Training extracts into fixed-size buffers (marching_tets_padded, PaddedSurface) whose sizes a
CapacityPlanner sets from counts read one step late, so the host never waits for the surface's
size. The SDF sign-change regularizer is computed here too: it acts on the crossing edges that
the extraction finds.

Classification backends: "torch" (any device) and "triton" (geometry/dmtet_triton.py's fused
kernels, CUDA, or CPU under TRITON_INTERPRET=1), chosen by the caller; asking for "triton" where
it is not importable raises MarchingBackendError (no silent fallback).
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from geometry.tet_grid import TET_EDGES, TetTopology
from render.util import gather_rows

# The fused classification kernels are GPU-only software: CPU machines often lack triton. The
# reason is kept for the error a request for the "triton" backend raises.
try:
    from geometry.dmtet_triton import classify_triton
except ImportError as _err:
    classify_triton = None
    _TRITON_MISSING: str | None = f"triton is not importable ({_err})"
else:
    _TRITON_MISSING = None

CLASSIFY_BACKENDS = ("torch", "triton")


class MarchingBackendError(RuntimeError):
    """The requested classification backend cannot run here (triton is not importable)."""


def _orient_outward(tri: list[int], inside: list[int], outside: list[int]) -> list[int]:
    """Order a triangle of local edge ids so its normal points from inside to outside vertices.

    Evaluated on the reference tet (origin + unit axes, positively oriented) with edge midpoints.
    Any positively oriented tet is an orientation-preserving affine image of it, and moving the
    crossing points along their edges keeps them separating the same vertices, so the winding
    found here is valid for every tet of a positively oriented grid.
    """
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=np.float64)
    mid = np.array([(ref[a] + ref[b]) / 2 for a, b in TET_EDGES])
    p0, p1, p2 = mid[tri]
    normal = np.cross(p1 - p0, p2 - p0)
    direction = ref[outside].mean(0) - ref[inside].mean(0)
    return tri if normal @ direction > 0 else [tri[0], tri[2], tri[1]]


def _triangle_table() -> tuple[torch.Tensor, torch.Tensor]:
    """(table [16, 2, 3] local edge ids (-1 unused), num_tris [16]) indexed by the inside bitmask."""
    edge_id = {pair: i for i, pair in enumerate(TET_EDGES)}
    table = -np.ones((16, 2, 3), dtype=np.int64)
    num = np.zeros(16, dtype=np.int64)
    for code in range(16):
        inside = [v for v in range(4) if code >> v & 1]
        outside = [v for v in range(4) if not code >> v & 1]
        crossing = lambda a, b: edge_id[(min(a, b), max(a, b))]  # noqa: E731
        if len(inside) in (1, 3):
            lone, others = (inside[0], outside) if len(inside) == 1 else (outside[0], inside)
            tris = [[crossing(lone, o) for o in others]]
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            quad = [crossing(a, c), crossing(a, d), crossing(b, d), crossing(b, c)]  # a cycle
            tris = [[quad[0], quad[1], quad[2]], [quad[0], quad[2], quad[3]]]
        else:
            tris = []
        for t, tri in enumerate(tris):
            table[code, t] = _orient_outward(tri, inside, outside)
        num[code] = len(tris)
    return torch.from_numpy(table), torch.from_numpy(num)


_TRI_TABLE, _NUM_TRIS = _triangle_table()


def marching_tets(verts_vx3: torch.Tensor, sdf_v: torch.Tensor, tets_tx4: torch.Tensor,
                  topology: TetTopology | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Extract the sdf = 0 surface of a tet mesh.

    Returns (verts [Nv, 3], faces [Nf, 3] int64); empty tensors when there is no crossing. The
    topology is computed without gradients; each output vertex lies on one grid edge (a, b) with
    sdf of opposite signs, at v = (p_a * (-s_b) + p_b * s_a) / (s_a - s_b), differentiable w.r.t.
    both `verts_vx3` and `sdf_v`. Output vertices are shared by all triangles using the same grid
    edge, so a closed zero set gives a watertight mesh; faces wind outward (sdf < 0 inside).

    `topology` (optional, `tet_topology(tets_tx4)` precomputed once): no per-call edge sort or
    unique, and a single device->host sync per call (all output sizes and the non-finite check
    are read together). The output is identical with and without it: vertices are ordered by
    grid edge (a, b) lexicographically, faces as all first triangles of the crossing tets in tet
    order followed by the second triangles of the two-triangle tets.
    """
    if topology is not None:
        return _marching_tets_topo(verts_vx3, sdf_v, tets_tx4, topology)
    _check_marching_inputs(verts_vx3, sdf_v, tets_tx4)
    device = verts_vx3.device
    with torch.no_grad():
        inside_v = sdf_v < 0  # [V]
        bits = torch.tensor([1, 2, 4, 8], device=device)
        code_t = (inside_v[tets_tx4].long() * bits).sum(1)  # [T]
        active = (code_t > 0) & (code_t < 15)
        act_tets = tets_tx4[active]  # [Ta, 4]
        act_code = code_t[active]  # [Ta]

        local = torch.tensor(TET_EDGES, device=device)  # [6, 2]
        edges = torch.sort(act_tets[:, local], dim=2).values.reshape(-1, 2)  # [Ta*6, 2]
        n_verts = verts_vx3.shape[0]
        keys = edges[:, 0] * n_verts + edges[:, 1]  # unique per undirected edge
        uniq_keys, inverse = torch.unique(keys, return_inverse=True)
        ua, ub = uniq_keys // n_verts, uniq_keys % n_verts
        crossing = inside_v[ua] != inside_v[ub]
        new_id = torch.cumsum(crossing.long(), 0) - 1  # dedup: one output vertex per grid edge
        new_id = torch.where(crossing, new_id, torch.full_like(new_id, -1))
        edge_to_vert = new_id[inverse].reshape(-1, 6)  # [Ta, 6]
        ia, ib = ua[crossing], ub[crossing]

        table = _TRI_TABLE.to(device)[act_code]  # [Ta, 2, 3]
        num = _NUM_TRIS.to(device)[act_code]  # [Ta]
        faces = []
        for t in range(2):
            has = num > t
            faces.append(torch.gather(edge_to_vert[has], 1, table[has, t]))
        faces_fx3 = torch.cat(faces, 0)

    s_a, s_b = sdf_v[ia][:, None], sdf_v[ib][:, None]
    p_a, p_b = verts_vx3[ia], verts_vx3[ib]
    # s_a and s_b have opposite signs (one < 0, one >= 0), so the denominator is never zero.
    out_verts = (p_a * (-s_b) + p_b * s_a) / (s_a - s_b)
    return out_verts, faces_fx3


_DEVICE_TABLES: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _device_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(triangle table [16, 2, 3] int64, bit weights [4] uint8) on `device`, copied there once."""
    tables = _DEVICE_TABLES.get(device)
    if tables is None:
        tables = (_TRI_TABLE.to(device), torch.tensor([1, 2, 4, 8], dtype=torch.uint8, device=device))
        _DEVICE_TABLES[device] = tables
    return tables


class SurfaceCapacity(NamedTuple):
    """Preallocated output sizes of marching_tets_padded."""
    tets: int           # crossing tets (each gives its first triangle)
    two: int            # crossing tets with two triangles (each gives a second one)
    verts: int          # crossing grid edges (one output vertex each)


class PaddedSurface(NamedTuple):
    """A surface in fixed-size buffers (marching_tets_padded).

    verts:  [capacity.verts + 1, 3]; rows past the crossing-edge count (at least the last one)
            are the origin and carry no gradient.
    faces:  [capacity.tets + capacity.two, 3] int64: the first triangles of the crossing tets in
            tet order, padded, then the second triangles, padded. Pad faces are (q, q, q): zero
            area, so both rasterizers cull them and antialiasing skips them. q = row index modulo
            the vertex count spreads them over the vertices: gradient scatters into one index
            serialize (100k pad faces on one vertex made the backward of a gather take 9 ms).
    counts: [4] int64 on the device: non-finite SDF values, crossing tets, two-triangle tets,
            crossing edges (the true sizes; a count above its capacity means faces were dropped);
            DMTetGeometry.extract_padded adds a 5th: the distinct grid vertices at crossing-edge
            ends, where it evaluates the network with gradients (at most capacity.verts + 1).
    """
    verts: torch.Tensor
    faces: torch.Tensor
    counts: torch.Tensor
    # ([capacity.verts + 1, 1] x 2): the SDF at the two ends (a, b) of each output vertex's edge,
    # with gradients, and [capacity.verts + 1] bool: the row is a crossing edge (not fill). All
    # that the sign-change regularizer needs; kept as made (no kernel) for steps without it.
    edge_sdf: tuple[torch.Tensor, torch.Tensor] | None = None
    edge_ok: torch.Tensor | None = None
    # [V] the SDF at every grid vertex without gradients (DMTetGeometry.extract_padded: the values
    # the signs came from), for what else needs the whole grid this step (the sealed-air search).
    grid_sdf: torch.Tensor | None = None

    def sign_change_loss(self) -> torch.Tensor:
        """sdf_sign_change_loss of the grid this surface came from (0-dim)."""
        return sign_change_bce(torch.cat(self.edge_sdf, 1), self.edge_ok)

    @staticmethod
    def overflow(counts: Sequence[int], capacity: SurfaceCapacity) -> bool:
        """True when host-read `counts` exceed `capacity` (that surface lost triangles)."""
        n_act, n_two, n_cross = counts[1:4]
        ends_over = len(counts) > 4 and counts[4] > capacity.verts + 1
        return n_act > capacity.tets or n_two > capacity.two or n_cross > capacity.verts or ends_over


def marching_tets_padded(verts_vx3: torch.Tensor, sdf_v: torch.Tensor, tets_tx4: torch.Tensor,
                         topology: TetTopology, capacity: SurfaceCapacity) -> PaddedSurface:
    """marching_tets without any device->host read: the output has fixed sizes (PaddedSurface).

    The rendered image and the gradients equal those of ``marching_tets`` while no count exceeds
    `capacity`; the caller reads ``counts`` later (e.g. one step late) to size the next call.
    Beyond the capacity, the crossing tets last in tet order lose their triangles.
    """
    _check_marching_shapes(verts_vx3, sdf_v, tets_tx4)
    _check_topology(tets_tx4, topology)
    if min(capacity) < 0:
        raise ValueError(f"marching_tets_padded: 'capacity' must be non-negative; got {capacity}")
    return _marching_tets_core(verts_vx3, sdf_v, tets_tx4, topology, capacity)


def _check_topology(tets_tx4: torch.Tensor, topo: TetTopology) -> None:
    if topo.tet_edges.shape != (tets_tx4.shape[0], 6) or topo.edges.ndim != 2 or topo.edges.shape[1] != 2:
        raise ValueError(f"marching_tets: 'topology' does not match the tets: tet_edges "
                         f"{tuple(topo.tet_edges.shape)} for {tets_tx4.shape[0]} tets, edges "
                         f"{tuple(topo.edges.shape)}")


def _marching_tets_topo(verts_vx3: torch.Tensor, sdf_v: torch.Tensor, tets_tx4: torch.Tensor,
                        topo: TetTopology) -> tuple[torch.Tensor, torch.Tensor]:
    """marching_tets with precomputed edges: one host sync (the output sizes), no sort."""
    _check_marching_shapes(verts_vx3, sdf_v, tets_tx4)
    _check_topology(tets_tx4, topo)
    surf = _marching_tets_core(verts_vx3, sdf_v, tets_tx4, topo, None)
    return surf.verts[:-1], surf.faces          # exact sizes: no pad faces, drop the pad vertex


def _marching_tets_core(verts_vx3: torch.Tensor, sdf_v: torch.Tensor, tets_tx4: torch.Tensor,
                        topo: TetTopology, capacity: SurfaceCapacity | None) -> PaddedSurface:
    """Both topology paths: `capacity` None reads the counts (the one host sync) and uses them."""
    st = surface_topology(sdf_v.detach(), tets_tx4, topo, capacity)
    s_a, s_b = gather_rows(sdf_v, st.ia)[:, None], gather_rows(sdf_v, st.ib)[:, None]
    p_a, p_b = gather_rows(verts_vx3, st.ia), gather_rows(verts_vx3, st.ib)
    return PaddedSurface(edge_vertices(s_a, s_b, p_a, p_b, st.v_ok), st.faces, st.counts, (s_a, s_b),
                         st.v_ok[:, 0])


class SurfaceTopology(NamedTuple):
    """A surface's connectivity in fixed-size buffers, found from the SDF's signs alone."""
    faces: torch.Tensor         # [Fcap, 3] int64, padded (PaddedSurface.faces)
    ia: torch.Tensor            # [Nv + 1] grid vertex at one end of each output vertex's edge
    ib: torch.Tensor            # [Nv + 1] ... and at the other end
    v_ok: torch.Tensor          # [Nv + 1, 1] bool: the row is a crossing edge (not fill)
    counts: torch.Tensor        # [4] int64 (PaddedSurface.counts)


@torch.no_grad()
def surface_topology(sdf_d: torch.Tensor, tets_tx4: torch.Tensor, topo: TetTopology,
                     capacity: SurfaceCapacity | None, backend: str = "torch") -> SurfaceTopology:
    """Which edges cross and the faces between them, from the SDF's signs alone (`backend`: classify's)."""
    table, _ = _device_tables(sdf_d.device)
    code_t, n_in, active, crossing, counts = classify(sdf_d, tets_tx4, topo, backend)
    if capacity is None:
        n_bad, n_act, n_two, n_cross = counts.tolist()                           # the one host sync
        if n_bad:
            raise_nonfinite(n_bad, sdf_d.numel())
        capacity = SurfaceCapacity(n_act, n_two, n_cross)
    n_out = capacity.verts + 1                                                   # output vertices
    act = torch.nonzero_static(active, size=capacity.tets).squeeze(1)            # [Ta] in tet order
    act_ok = torch.arange(capacity.tets, device=act.device) < counts[1]          # real rows (not fill)
    code = code_t[act].long()                                                    # [Ta] in 1..14
    vid = torch.cumsum(crossing, 0) - 1                                          # [E] id at crossing edges
    edge_vid = vid[topo.tet_edges[act]]                                          # [Ta, 6]
    tri = table[code].clamp(min=0)                                               # [Ta, 2, 3]; fill rows: any
    faces0 = torch.gather(edge_vid, 1, tri[:, 0])                                # [Ta, 3]
    two_rows = act_ok & (n_in[act] == 2)
    two = torch.nonzero_static(two_rows, size=capacity.two).squeeze(1)           # [Ta2]
    two_ok = torch.arange(capacity.two, device=act.device) < two_rows.sum()
    faces1 = torch.gather(edge_vid[two], 1, tri[two, 1])                         # [Ta2, 3]
    faces = pad_faces(torch.cat([faces0, faces1], 0), torch.cat([act_ok, two_ok]), n_out)
    cross_ab = topo.edges[torch.nonzero_static(crossing, size=n_out).squeeze(1)]  # [Nv + 1, 2]
    v_ok = (torch.arange(n_out, device=act.device) < counts[3].clamp(max=n_out - 1))[:, None]
    return SurfaceTopology(faces, cross_ab[:, 0].contiguous(), cross_ab[:, 1].contiguous(), v_ok, counts)


def edge_vertices(s_a: torch.Tensor, s_b: torch.Tensor, p_a: torch.Tensor, p_b: torch.Tensor,
                  v_ok: torch.Tensor) -> torch.Tensor:
    """The zero crossing on each edge: [N, 3] from end values s [N, 1] and positions p [N, 3]."""
    # Fill rows (not a crossing edge; always the last row) become the origin, with no gradient:
    # s_a = -1, s_b = 1 keep the division finite. On crossing edges s_a and s_b have opposite signs
    # (one < 0, one >= 0), so the denominator is never zero.
    s_a = torch.where(v_ok, s_a, -1.0)
    s_b = torch.where(v_ok, s_b, 1.0)
    p_a = torch.where(v_ok, p_a, 0.0)
    p_b = torch.where(v_ok, p_b, 0.0)
    return (p_a * (-s_b) + p_b * s_a) / (s_a - s_b)


@torch.no_grad()
def edge_ends(ia: torch.Tensor, ib: torch.Tensor, v_ok: torch.Tensor, n_grid: int
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct grid vertices at the crossing edges' ends, in a buffer as long as ia (fill:
    vertex 0): (ends [U], slot of ia / ib in ends [N], both slots inside the buffer [N, 1],
    distinct-end count []). Distinct ends never exceed ~1.1x the crossing edges on a tet grid
    (a lone vertex with its 14 edges has 15), below the buffers' 1.5x headroom."""
    size = ia.shape[0]
    mark = torch.zeros(n_grid, dtype=torch.uint8, device=ia.device)
    ok_u8 = v_ok[:, 0].to(torch.uint8)
    mark.scatter_reduce_(0, ia, ok_u8, "amax")
    mark.scatter_reduce_(0, ib, ok_u8, "amax")
    ends = torch.nonzero_static(mark, size=size).squeeze(1)                     # [U] ascending
    slot = torch.cumsum(mark, 0) - 1                                            # [V] position in ends
    slot_a, slot_b = slot[ia], slot[ib]
    ends_ok = ((slot_a < size) & (slot_b < size))[:, None]
    return ends, slot_a.clamp(0, size - 1), slot_b.clamp(0, size - 1), ends_ok, mark.sum()


class Classified(NamedTuple):
    """Which tets and edges of a grid cross the surface (classify)."""
    code: torch.Tensor          # [T] uint8: sum of 2^k over the tet's corners k inside (sdf < 0), 0..15
    n_in: torch.Tensor          # [T] uint8 corners inside
    active: torch.Tensor        # [T] bool: the tet crosses the surface
    crossing: torch.Tensor      # [E] bool: the edge crosses the surface
    counts: torch.Tensor        # [4] int64: non-finite sdf, crossing tets, two-triangle tets, crossing edges


def classify(sdf_d: torch.Tensor, tets_tx4: torch.Tensor, topo: TetTopology, backend: str = "torch") -> Classified:
    """Which tets and edges cross the surface. backend "triton": geometry/dmtet_triton.py's two
    fused kernels (CUDA, or CPU under TRITON_INTERPRET=1), equal to the "torch" reference bit for bit."""
    if backend == "triton":
        if _TRITON_MISSING:
            raise MarchingBackendError(f"classify: backend 'triton' requested but {_TRITON_MISSING}; "
                                       "use backend='torch'")
        return Classified(*classify_triton(sdf_d, tets_tx4, topo.edges))
    if backend != "torch":
        raise ValueError(f"classify: argument 'backend' must be one of {CLASSIFY_BACKENDS}; got {backend!r}")
    return _classify_torch(sdf_d, tets_tx4, topo)


def _classify_torch(sdf_d: torch.Tensor, tets_tx4: torch.Tensor, topo: TetTopology) -> Classified:
    _, bits = _device_tables(sdf_d.device)
    inside_u8 = (sdf_d < 0).to(torch.uint8)                                     # [V]
    corner = inside_u8[tets_tx4]                                                 # [T, 4] uint8
    n_in = corner.sum(1, dtype=torch.uint8)                                      # [T] corners inside
    code = (corner * bits).sum(1, dtype=torch.uint8)                             # [T] 0..15
    active = (n_in > 0) & (n_in < 4)                                             # crosses the surface
    crossing = inside_u8[topo.edges[:, 0]] != inside_u8[topo.edges[:, 1]]        # [E]
    counts = torch.stack([(~torch.isfinite(sdf_d)).sum(), active.sum(), (n_in == 2).sum(), crossing.sum()])
    return Classified(code, n_in, active, crossing, counts)


def pad_faces(faces_fx3: torch.Tensor, row_ok: torch.Tensor, n_verts: int) -> torch.Tensor:
    """Rows that are fill, or that name a vertex past the buffer (overflow: the last row is never a
    crossing), become (q, q, q) with q = row mod n_verts (see PaddedSurface)."""
    ok = row_ok & (faces_fx3 < n_verts - 1).all(1)
    q = torch.arange(faces_fx3.shape[0], device=faces_fx3.device) % n_verts
    return torch.where(ok[:, None], faces_fx3, q[:, None])


def _check_marching_inputs(verts_vx3: torch.Tensor, sdf_v: torch.Tensor, tets_tx4: torch.Tensor
                           ) -> None:
    _check_marching_shapes(verts_vx3, sdf_v, tets_tx4)
    n_bad = int((~torch.isfinite(sdf_v.detach())).sum())
    if n_bad:
        raise_nonfinite(n_bad, sdf_v.numel())


def _check_marching_shapes(verts_vx3: torch.Tensor, sdf_v: torch.Tensor, tets_tx4: torch.Tensor
                           ) -> None:
    if verts_vx3.ndim != 2 or verts_vx3.shape[1] != 3:
        raise ValueError(f"marching_tets: 'verts' must be [V, 3]; got {tuple(verts_vx3.shape)}")
    if sdf_v.shape != verts_vx3.shape[:1]:
        raise ValueError(f"marching_tets: 'sdf' must be [V] = [{verts_vx3.shape[0]}]; "
                         f"got {tuple(sdf_v.shape)}")
    if tets_tx4.ndim != 2 or tets_tx4.shape[1] != 4 or tets_tx4.dtype != torch.int64:
        raise ValueError(f"marching_tets: 'tets' must be [T, 4] int64; "
                         f"got {tuple(tets_tx4.shape)} {tets_tx4.dtype}")


def raise_nonfinite(n_bad: int, n_total: int) -> None:
    """Raise the ValueError of an SDF with `n_bad` non-finite values of `n_total`."""
    raise ValueError(f"marching_tets: 'sdf' has {n_bad} non-finite values of {n_total}; "
                     "the SDF network diverged (check the learning rate and loss scaling)")


class CapacityPlanner:
    """Sizes marching_tets_padded's buffers from counts read one step late.

    Before the first update there is nothing to size from (DMTetGeometry.extract_padded then reads
    the counts once). The capacity is ``HEADROOM`` times the counts, rounded up, and is reset
    whenever a count comes within ``GROW_AT`` of its capacity or all fall under ``SHRINK_BELOW``:
    the surface changes little per step, so a step that outgrows its buffers is rare (its crossing
    tets last in tet order lose their triangles for that step; PaddedSurface.overflow tells).
    """

    HEADROOM, GROW_AT, SHRINK_BELOW, ROUND = 1.5, 0.85, 0.35, 1024

    def __init__(self) -> None:
        self.capacity: SurfaceCapacity | None = None

    def _sized(self, counts: Sequence[int]) -> SurfaceCapacity:
        def up(n: int) -> int:
            return max(self.ROUND, math.ceil(n * self.HEADROOM / self.ROUND) * self.ROUND)
        n_act, n_two, n_cross = counts[1:4]
        return SurfaceCapacity(up(n_act), up(n_two), up(n_cross))

    def update(self, counts: Sequence[int]) -> None:
        """Resize from a step's host-read PaddedSurface counts (the next call uses the new sizes)."""
        if self.capacity is None:
            self.capacity = self._sized(counts)
            return
        sizes = list(zip(counts[1:4], self.capacity))
        if any(n > self.GROW_AT * c for n, c in sizes) or all(n < self.SHRINK_BELOW * c for n, c in sizes):
            self.capacity = self._sized(counts)


# ----------------------------------------------------------------------------------------------
# SDF regularizer
# ----------------------------------------------------------------------------------------------

def sdf_sign_change_loss(sdf_v: torch.Tensor, edges_ex2: torch.Tensor) -> torch.Tensor:
    """nvdiffrec's SDF regularizer: BCE-with-logits on tet edges whose endpoints change sign.

    sdf_v [V], edges_ex2 [E, 2] int64 grid vertex pairs. For each crossing edge (a, b), s_a is
    pushed towards the sign of s_b and vice versa, which removes floaters and internal sheets that
    no view sees. Symmetric under sdf -> -sdf, so it does not care about the inside sign. Returns a
    scalar; zero (still attached to the graph) without crossings.
    """
    s = sdf_v[edges_ex2.reshape(-1)].reshape(-1, 2)
    return sign_change_bce(s, torch.sign(s[:, 0]) != torch.sign(s[:, 1]))


def sign_change_bce(s_ex2: torch.Tensor, ok_e: torch.Tensor) -> torch.Tensor:
    """Mean over the rows where `ok_e` [E] of BCE(s_a, s_b > 0) + BCE(s_b, s_a > 0), s_ex2 [E, 2]
    (nvdiffrec's two means summed); 0 without such rows. Rows outside `ok_e` get no gradient."""
    target = (s_ex2.detach().flip(1) > 0).to(s_ex2.dtype)
    bce = nn.functional.binary_cross_entropy_with_logits(s_ex2, target, reduction="none").sum(1)   # [E]
    return torch.where(ok_e, bce, 0.0).sum() / ok_e.sum().clamp(min=1)
