"""DMTet: tetrahedral grids, differentiable marching tetrahedra and the SDF/deformation geometry.

Sign convention: sdf < 0 is inside the surface, sdf >= 0 outside. Extracted triangles are wound
counter-clockwise seen from outside, i.e. their normals (v1 - v0) x (v2 - v0) point outward.

Tet grids are generated here (no shipped binaries): a regular grid with res/2 cells per axis, each
cube split into 6 tetrahedra along its main diagonal (Kuhn / Freudenthal triangulation). Because
every cube uses the same diagonal and the same axis-permutation split, neighbouring cubes split
their shared face along the same diagonal, so the tetrahedralization is conforming.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
from torch import nn

from geometry.hashgrid import HashGridOptions
from geometry.sdf_net import SDFNetwork
from render.util import gather_rows

log = logging.getLogger(__name__)

# Resolved from this file, not the CWD, so every entry point shares one cache.
TET_CACHE_DIR = Path(__file__).resolve().parent.parent / "data" / "tets"
_TET_CACHE_VERSION = 1

# The 6 edges of a tetrahedron as pairs of local vertex ids; local edge id = position in this list.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


class TetGridError(ValueError):
    """Invalid tet-grid request (resolution)."""


class EmptyMeshError(RuntimeError):
    """Marching tets produced no triangles: the SDF has no zero crossing inside the grid."""


# ----------------------------------------------------------------------------------------------
# Tet grid
# ----------------------------------------------------------------------------------------------

def _kuhn_cube_tets() -> np.ndarray:
    """[6, 4, 3] int corner offsets of the 6 Kuhn tets of the unit cube, all positively oriented."""
    tets = []
    for perm in itertools.permutations(range(3)):
        corner = np.zeros(3, dtype=np.int64)
        path = [corner.copy()]
        for axis in perm:  # walk from (0,0,0) to (1,1,1) adding one axis at a time
            corner[axis] += 1
            path.append(corner.copy())
        tet = np.stack(path)  # [4, 3]
        if np.linalg.det((tet[1:] - tet[0]).astype(np.float64)) < 0:
            tet[[1, 2]] = tet[[2, 1]]  # odd permutation: swap two vertices to fix the orientation
        tets.append(tet)
    return np.stack(tets)


def _build_tet_grid(res: int) -> tuple[np.ndarray, np.ndarray]:
    n = res // 2  # cells per axis
    coords = np.linspace(-0.5, 0.5, n + 1, dtype=np.float64)
    gi, gj, gk = np.meshgrid(coords, coords, coords, indexing="ij")
    verts_vx3 = np.stack([gi, gj, gk], axis=-1).reshape(-1, 3).astype(np.float32)

    # Vertex id of lattice point (i, j, k) is i*(n+1)^2 + j*(n+1) + k (matches the meshgrid order).
    stride = np.array([(n + 1) ** 2, n + 1, 1], dtype=np.int64)
    cell = np.arange(n, dtype=np.int64)
    ci, cj, ck = np.meshgrid(cell, cell, cell, indexing="ij")
    cube_base_c = (np.stack([ci, cj, ck], axis=-1).reshape(-1, 3) @ stride)  # [C]
    corner_off_6x4 = _kuhn_cube_tets() @ stride  # [6, 4]
    tets_tx4 = (cube_base_c[:, None, None] + corner_off_6x4[None]).reshape(-1, 4)
    return verts_vx3, tets_tx4


def _check_res(res: int) -> None:
    if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or res < 2 or res % 2:
        raise TetGridError(
            f"tet_grid: argument 'res' (dmtet_grid) must be an even integer >= 2 "
            f"(the grid has res/2 cells per axis); got {res!r}")


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:  # a file object keeps numpy from appending ".npz"
            np.savez(f, **arrays)
        os.replace(tmp, path)  # atomic: concurrent readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def tet_grid(res: int, cache_dir: Path | str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Tetrahedral grid named by `dmtet_grid` = res.

    Returns (verts [V, 3] float32 in [-0.5, 0.5]^3, tets [T, 4] int64) with V = (res/2 + 1)^3 and
    T = 6 (res/2)^3, every tet positively oriented (det[v1-v0, v2-v0, v3-v0] > 0). Cached as
    `data/tets/kuhn_<res>.npz` (or under `cache_dir`); generated vectorized on a miss.
    """
    _check_res(res)
    cache = Path(cache_dir) if cache_dir is not None else TET_CACHE_DIR
    path = cache / f"kuhn_v{_TET_CACHE_VERSION}_{res}.npz"
    if path.exists():
        try:
            with np.load(path) as data:
                return data["verts"], data["tets"].astype(np.int64)
        except (OSError, KeyError, ValueError) as err:  # corrupt or foreign file: rebuild it
            log.warning("tet grid cache %s unreadable (%s); regenerating", path, err)
    verts, tets = _build_tet_grid(int(res))
    # int32 on disk halves the file (res 256: 12.6M tets); indices are < 2^31 for any sane res.
    _atomic_save_npz(path, verts=verts, tets=tets.astype(np.int32))
    return verts, tets


def tet_edges(tets_tx4: torch.Tensor) -> torch.Tensor:
    """Unique undirected edges of a tet mesh: [E, 2] int64, each row sorted (a < b)."""
    edges = tets_tx4[:, list(itertools.chain.from_iterable(TET_EDGES))].reshape(-1, 2)
    edges = torch.sort(edges, dim=1).values
    return torch.unique(edges, dim=0)


class TetTopology(NamedTuple):
    """Static edge topology of a tet grid, computed once (DMTetGeometry keeps it as buffers).

    edges:     [E, 2] int64 unique undirected edges, rows sorted (a < b), rows in lexicographic
               order (identical to `tet_edges`).
    tet_edges: [T, 6] int32 (or int64) global edge id of each tet's local edge TET_EDGES[k].
    """

    edges: torch.Tensor
    tet_edges: torch.Tensor


def tet_topology(tets_tx4: torch.Tensor) -> TetTopology:
    """Edges of a tet mesh and, for every tet, the ids of its 6 edges (one sort, at setup time)."""
    n = int(tets_tx4.max()) + 1 if tets_tx4.numel() else 0
    local = torch.tensor(TET_EDGES, device=tets_tx4.device)                      # [6, 2]
    pairs = tets_tx4[:, local]                                                   # [T, 6, 2]
    lo, hi = torch.minimum(pairs[..., 0], pairs[..., 1]), torch.maximum(pairs[..., 0], pairs[..., 1])
    del pairs
    keys = (lo * n + hi).reshape(-1)                                             # a*V + b: lexicographic
    del lo, hi
    uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
    del keys
    edges = torch.stack([uniq // n, uniq % n], dim=1) if n else uniq.new_zeros(0, 2)
    idx_dtype = torch.int32 if uniq.numel() < 2 ** 31 else torch.int64
    return TetTopology(edges=edges, tet_edges=inverse.reshape(-1, 6).to(idx_dtype))


# ----------------------------------------------------------------------------------------------
# Marching tets
# ----------------------------------------------------------------------------------------------

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
    st = _surface_topology(sdf_v.detach(), tets_tx4, topo, capacity)
    s_a, s_b = gather_rows(sdf_v, st.ia)[:, None], gather_rows(sdf_v, st.ib)[:, None]
    p_a, p_b = gather_rows(verts_vx3, st.ia), gather_rows(verts_vx3, st.ib)
    return PaddedSurface(_edge_vertices(s_a, s_b, p_a, p_b, st.v_ok), st.faces, st.counts, (s_a, s_b),
                         st.v_ok[:, 0])


class _SurfaceTopology(NamedTuple):
    faces: torch.Tensor         # [Fcap, 3] int64, padded (PaddedSurface.faces)
    ia: torch.Tensor            # [Nv + 1] grid vertex at one end of each output vertex's edge
    ib: torch.Tensor            # [Nv + 1] ... and at the other end
    v_ok: torch.Tensor          # [Nv + 1, 1] bool: the row is a crossing edge (not fill)
    counts: torch.Tensor        # [4] int64 (PaddedSurface.counts)


@torch.no_grad()
def _surface_topology(sdf_d: torch.Tensor, tets_tx4: torch.Tensor, topo: TetTopology,
                      capacity: SurfaceCapacity | None, backend: str = "torch") -> _SurfaceTopology:
    """Which edges cross and the faces between them, from the SDF's signs alone (`backend`: _classify's)."""
    table, _ = _device_tables(sdf_d.device)
    code_t, n_in, active, crossing, counts = _classify(sdf_d, tets_tx4, topo, backend)
    if capacity is None:
        n_bad, n_act, n_two, n_cross = counts.tolist()                           # the one host sync
        if n_bad:
            _raise_nonfinite(n_bad, sdf_d.numel())
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
    faces = _pad_faces(torch.cat([faces0, faces1], 0), torch.cat([act_ok, two_ok]), n_out)
    cross_ab = topo.edges[torch.nonzero_static(crossing, size=n_out).squeeze(1)]  # [Nv + 1, 2]
    v_ok = (torch.arange(n_out, device=act.device) < counts[3].clamp(max=n_out - 1))[:, None]
    return _SurfaceTopology(faces, cross_ab[:, 0].contiguous(), cross_ab[:, 1].contiguous(), v_ok, counts)


def _edge_vertices(s_a: torch.Tensor, s_b: torch.Tensor, p_a: torch.Tensor, p_b: torch.Tensor,
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
def _edge_ends(ia: torch.Tensor, ib: torch.Tensor, v_ok: torch.Tensor, n_grid: int
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


class _Classified(NamedTuple):
    code: torch.Tensor          # [T] uint8: sum of 2^k over the tet's corners k inside (sdf < 0), 0..15
    n_in: torch.Tensor          # [T] uint8 corners inside
    active: torch.Tensor        # [T] bool: the tet crosses the surface
    crossing: torch.Tensor      # [E] bool: the edge crosses the surface
    counts: torch.Tensor        # [4] int64: non-finite sdf, crossing tets, two-triangle tets, crossing edges


CLASSIFY_BACKENDS = ("torch", "triton")


def _classify(sdf_d: torch.Tensor, tets_tx4: torch.Tensor, topo: TetTopology, backend: str = "torch") -> _Classified:
    """Which tets and edges cross the surface. backend "triton": geometry/dmtet_triton.py's two
    fused kernels (CUDA, or CPU under TRITON_INTERPRET=1), equal to the "torch" reference bit for bit."""
    if backend == "triton":
        from geometry.dmtet_triton import classify_triton
        return _Classified(*classify_triton(sdf_d, tets_tx4, topo.edges))
    if backend != "torch":
        raise ValueError(f"_classify: backend must be one of {CLASSIFY_BACKENDS}, got {backend!r}")
    return _classify_torch(sdf_d, tets_tx4, topo)


def _classify_torch(sdf_d: torch.Tensor, tets_tx4: torch.Tensor, topo: TetTopology) -> _Classified:
    _, bits = _device_tables(sdf_d.device)
    inside_u8 = (sdf_d < 0).to(torch.uint8)                                     # [V]
    corner = inside_u8[tets_tx4]                                                 # [T, 4] uint8
    n_in = corner.sum(1, dtype=torch.uint8)                                      # [T] corners inside
    code = (corner * bits).sum(1, dtype=torch.uint8)                             # [T] 0..15
    active = (n_in > 0) & (n_in < 4)                                             # crosses the surface
    crossing = inside_u8[topo.edges[:, 0]] != inside_u8[topo.edges[:, 1]]        # [E]
    counts = torch.stack([(~torch.isfinite(sdf_d)).sum(), active.sum(), (n_in == 2).sum(), crossing.sum()])
    return _Classified(code, n_in, active, crossing, counts)


def _pad_faces(faces_fx3: torch.Tensor, row_ok: torch.Tensor, n_verts: int) -> torch.Tensor:
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
        _raise_nonfinite(n_bad, sdf_v.numel())


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


def _raise_nonfinite(n_bad: int, n_total: int) -> None:
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


def sdf_regularizer_weight(weight: float, it: int, iters: int) -> float:
    """nvdiffrec's schedule: `weight` at the start, falling linearly to weight / 20 at a quarter of
    the run, then constant."""
    return weight - (weight - weight / 20) * min(1.0, 4.0 * it / iters)


# ----------------------------------------------------------------------------------------------
# Sealed air
# ----------------------------------------------------------------------------------------------

def _kuhn_stencil() -> np.ndarray:
    """[3, 3, 3] bool: the lattice offsets joined by an edge of a Kuhn tet (and the centre): the
    axes, the diagonals e_i + e_j and e_x + e_y + e_z, each both ways (14 neighbours)."""
    offsets = {tuple(b - a) for tet in _kuhn_cube_tets() for a in tet for b in tet}   # includes (0, 0, 0)
    stencil = np.zeros((3, 3, 3), dtype=bool)
    for d in offsets:
        stencil[tuple(np.array(d) + 1)] = True
    return stencil


def sealed_air(sdf_v: torch.Tensor, grid_res: int) -> torch.Tensor:
    """Grid vertices outside the surface (sdf > 0) that no path of outside vertices along tet edges
    joins to the grid box's boundary: air sealed inside the solid, which no camera can see.

    sdf_v [V] on the vertices of ``tet_grid(grid_res)`` (a lattice of n = grid_res / 2 + 1 vertices
    per axis, V = n^3, in its order). Returns [V] bool on sdf_v's device. The components come from
    scipy.ndimage on the host (the tet edges are the lattice's 14-neighbour stencil), so this waits
    for the device. Only the bounding box of the inside vertices is searched: every vertex beyond it
    is outside and joined to the grid's faces along an axis, so every outside vertex on the box's
    faces is open, and a path that leaves the box passes one of them. None are sealed when no vertex
    on the grid's faces is outside (a shape that fills the box leaves nothing to call the outside).
    """
    from scipy import ndimage
    _check_res(grid_res)
    n = grid_res // 2 + 1
    if sdf_v.shape != (n ** 3,):
        raise ValueError(f"sealed_air: expected sdf_v [{n ** 3}] (the dmtet_grid={grid_res} lattice, {n}^3 "
                         f"vertices); got {tuple(sdf_v.shape)}")
    outside = (sdf_v.detach() > 0).reshape(n, n, n)
    sealed = torch.zeros_like(outside)
    faces_outside = torch.stack([outside[0].any(), outside[-1].any(), outside[:, 0].any(), outside[:, -1].any(),
                                 outside[:, :, 0].any(), outside[:, :, -1].any()]).any()
    inside = torch.nonzero(~outside)                                      # [I, 3] lattice indices
    if inside.shape[0] == 0 or not bool(faces_outside):
        return sealed.reshape(-1)
    lo, hi = inside.min(0).values.tolist(), (inside.max(0).values + 1).tolist()
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(lo[2], hi[2]))
    air = outside[box].cpu().numpy()                                      # the searched box
    label, _ = ndimage.label(air, structure=_kuhn_stencil())
    faces = np.concatenate([f.ravel() for f in (label[0], label[-1], label[:, 0], label[:, -1],
                                                 label[:, :, 0], label[:, :, -1])])
    sealed_box = air & ~np.isin(label, faces[faces > 0])
    sealed[box] = torch.from_numpy(sealed_box).to(sdf_v.device)
    return sealed.reshape(-1)


def sealed_air_loss(sdf_r: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of relu(sdf + margin) over the SDF values `sdf_r` [R] of sealed-air vertices: pushes each
    to at least `margin` inside; 0 (attached to the graph) when R = 0."""
    return torch.relu(sdf_r + margin).sum() / max(sdf_r.numel(), 1)


# ----------------------------------------------------------------------------------------------
# DMTet geometry
# ----------------------------------------------------------------------------------------------

class DMTetGeometry(nn.Module):
    """SDF + deformation on a tet grid, both predicted by a hash-grid MLP
    (docs/DESIGN.md, "Conventions and formulas").

    vertices = grid * mesh_scale + (1 / grid_res) * tanh(deform); the network is evaluated at the
    undeformed grid vertices, normalized to the grid's AABB [-0.5, 0.5]^3 * mesh_scale.
    """

    def __init__(self, grid_res: int, mesh_scale: float, encoder_opts: HashGridOptions | None = None,
                 backend: str = "auto", device: torch.device | str = "cpu",
                 cache_dir: Path | str | None = None) -> None:
        super().__init__()
        if not (isinstance(mesh_scale, (int, float)) and math.isfinite(mesh_scale) and mesh_scale > 0):
            raise ValueError(f"DMTetGeometry: 'mesh_scale' must be a positive finite number; "
                             f"got {mesh_scale!r}")
        self.mesh_scale = float(mesh_scale)
        self.cache_dir = cache_dir
        device = torch.device(device)
        self._register_grid(int(grid_res), device)
        half = 0.5 * self.mesh_scale
        aabb_2x3 = torch.tensor([[-half] * 3, [half] * 3], dtype=torch.float32, device=device)
        self.sdf_net = SDFNetwork(aabb_2x3, encoder_opts, backend=backend)
        # The geometry's Triton kernels go together: with the hash grid's "triton" backend the
        # training extraction also classifies tets with Triton (geometry/dmtet_triton.py).
        self.classify_backend = "triton" if self.sdf_net.backend == "triton" else "torch"

    def _register_grid(self, grid_res: int, device: torch.device) -> None:
        verts, tets = tet_grid(grid_res, self.cache_dir)
        self.grid_res = grid_res
        self.register_buffer("grid_verts", torch.from_numpy(verts).to(device) * self.mesh_scale)
        self.register_buffer("tets", torch.from_numpy(tets).to(device))
        topo = tet_topology(self.tets)
        self.register_buffer("edges", topo.edges)
        # Static per-tet edge ids for marching_tets; derived from `tets`, so not in the state dict.
        self.register_buffer("tet_edge_ids", topo.tet_edges, persistent=False)

    def set_grid(self, grid_res: int) -> None:
        """Sample the same SDF network on another tet grid (the network is a function of position,
        so nothing is learned again); no-op at the current resolution."""
        if int(grid_res) != self.grid_res:
            self._register_grid(int(grid_res), self.grid_verts.device)

    @property
    def topology(self) -> TetTopology:
        """Precomputed edge topology of the grid (pass it to marching_tets)."""
        return TetTopology(self.edges, self.tet_edge_ids)

    @property
    def aabb(self) -> torch.Tensor:
        """[2, 3] min/max corner of the tet grid box."""
        return self.sdf_net.encoder.aabb

    def sdf_and_deform(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(sdf [V], deform [V, 3]) predicted at the undeformed grid vertices."""
        return self.sdf_net(self.grid_verts)

    def deformed_verts(self, deform_vx3: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Grid vertices moved by their predicted deformation; `rows` [N]: only those vertices
        (deform_vx3 then [N, 3], their deformations)."""
        base = self.grid_verts if rows is None else self.grid_verts[rows]
        return base + torch.tanh(deform_vx3) / self.grid_res

    def extract_with_sdf(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(verts [Nv, 3], faces [Nf, 3] int64, sdf [V]); raises EmptyMeshError without triangles."""
        sdf, deform = self.sdf_and_deform()
        verts, faces = marching_tets(self.deformed_verts(deform), sdf, self.tets, self.topology)
        if faces.shape[0] == 0:
            raise EmptyMeshError(_empty_mesh_message(sdf.detach(), self.grid_res, self.mesh_scale))
        return verts, faces, sdf

    def extract_padded(self, planner: CapacityPlanner) -> PaddedSurface:
        """The surface in fixed-size buffers sized by `planner`, without a host read (except the
        planner's first call); feed ``counts`` (read later) to ``planner.update``.

        The same surface and gradients as marching_tets_padded on every grid vertex, cheaper: the
        signs at every vertex come from a forward pass without gradients, and the network runs
        again, with gradients, only at the ends of the crossing edges (the output vertices depend
        on nothing else), so the backward covers ~1 in 5 of the grid's vertices at grid 128 and
        ~1 in 10 at grid 256 instead of all of them.
        """
        with torch.no_grad():
            sdf_all, deform_all = self.sdf_and_deform()                          # [V], [V, 3]
        if planner.capacity is None:   # the one host read: nothing to size the buffers from yet
            counts = _classify(sdf_all, self.tets, self.topology, self.classify_backend).counts.tolist()
            self.check_counts(counts)
            planner.update(counts)
        st = _surface_topology(sdf_all, self.tets, self.topology, planner.capacity, self.classify_backend)
        ends, slot_a, slot_b, ends_ok, n_ends = _edge_ends(st.ia, st.ib, st.v_ok, self.grid_verts.shape[0])
        sdf_e, deform_e = self.sdf_net(self.grid_verts[ends])                   # [U], [U, 3] with gradients
        pos_e = self.deformed_verts(deform_e, ends)

        def at(slot: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # (sdf [N, 1], position [N, 3]) of the edge ends `rows`: the full pass's values (the ones
            # the signs came from: no sign can disagree) with the gradient of the ends' pass (the
            # same function at the same points).
            s, p = gather_rows(sdf_e, slot), gather_rows(pos_e, slot)
            s_full, p_full = sdf_all[rows], self.deformed_verts(deform_all[rows], rows)
            return (s - s.detach() + s_full)[:, None], p - p.detach() + p_full
        v_ok = st.v_ok & ends_ok
        (s_a, p_a), (s_b, p_b) = at(slot_a, st.ia), at(slot_b, st.ib)
        verts = _edge_vertices(s_a, s_b, p_a, p_b, v_ok)
        # Only when the ends outgrew their buffer (counted, reported late): drop faces that use them
        # (pad faces come out as they went in: the same row gives the same pad vertex).
        faces = _pad_faces(st.faces, v_ok[:, 0][st.faces].all(1), v_ok.shape[0])
        return PaddedSurface(verts, faces, torch.cat([st.counts, n_ends.view(1)]), (s_a, s_b), v_ok[:, 0], sdf_all)

    def check_counts(self, counts: Sequence[int]) -> None:
        """Raise for host-read PaddedSurface counts of a broken surface: a non-finite SDF
        (ValueError) or no triangles (EmptyMeshError), as extract() does."""
        n_bad, n_act = counts[0], counts[1]
        if n_bad:
            _raise_nonfinite(n_bad, self.grid_verts.shape[0])
        if n_act == 0:
            with torch.no_grad():
                sdf = self.sdf_and_deform()[0]
            raise EmptyMeshError(_empty_mesh_message(sdf, self.grid_res, self.mesh_scale))

    def sealed_air_rows(self, sdf_v: torch.Tensor | None = None) -> torch.Tensor:
        """[R] int64 ids of the grid vertices of sealed air (``sealed_air``) in the current SDF, or in
        `sdf_v` [V] when given (e.g. a PaddedSurface's grid_sdf: no second pass); waits for the device."""
        if sdf_v is None:
            with torch.no_grad():
                sdf_v = self.sdf_and_deform()[0]
        return torch.nonzero(sealed_air(sdf_v, self.grid_res)).squeeze(1)

    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        verts, faces, _ = self.extract_with_sdf()
        return verts, faces

    def mesh(self, with_normals: bool = True):
        """The current surface as a render.mesh.Mesh (area-weighted vertex normals by default)."""
        from render.mesh import Mesh, compute_vertex_normals  # geometry/ -> render/ is allowed

        verts, faces = self.extract()
        m = Mesh(v_pos=verts, t_pos_idx=faces, v_nrm=None, t_nrm_idx=None, v_tex=None,
                 t_tex_idx=None, v_tng=None, t_tng_idx=None, material=None)
        return compute_vertex_normals(m) if with_normals else m


def _empty_mesh_message(sdf_v: torch.Tensor, grid_res: int, mesh_scale: float) -> str:
    lo, hi = float(sdf_v.min()), float(sdf_v.max())
    if lo >= 0:
        state = f"every grid vertex is outside (sdf >= 0, min {lo:.4g}): the shape vanished"
    else:
        state = f"every grid vertex is inside (sdf < 0, max {hi:.4g}): the shape fills the grid"
    return (f"marching tets produced no triangles on the dmtet_grid={grid_res} grid "
            f"(mesh_scale={mesh_scale}): {state}. Likely fixes: with Stable Diffusion guidance, lower "
            "'guidance_weight' (SDS too strong destroys the shape early); check that "
            "'sdf_init_shape_scale', 'translation_y' and 'translation_z' put the initial shape inside "
            "the grid box [-0.5, 0.5]^3 * mesh_scale and that 'mesh_scale' is large enough to contain "
            "it; make sure the SDF pretraining ran (sdf_init_iter > 0).")
