"""Tetrahedral grids: generation and cache, grid vertices, edges and the per-tet edge table.

Tet grids are generated here (no shipped binaries): a regular grid with res/2 cells per axis, each
cube split into 6 tetrahedra along its main diagonal (Kuhn / Freudenthal triangulation). Because
every cube uses the same diagonal and the same axis-permutation split, neighbouring cubes split
their shared face along the same diagonal, so the tetrahedralization is conforming.
"""
from __future__ import annotations

import itertools
import logging
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

log = logging.getLogger(__name__)

# Resolved from this file, not the CWD, so every entry point shares one cache.
TET_CACHE_DIR = Path(__file__).resolve().parent.parent / "data" / "tets"
_TET_CACHE_VERSION = 1

# The 6 edges of a tetrahedron as pairs of local vertex ids; local edge id = position in this list.
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


class TetGridError(ValueError):
    """Invalid tet-grid request (resolution)."""


def kuhn_cube_tets() -> np.ndarray:
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
    corner_off_6x4 = kuhn_cube_tets() @ stride  # [6, 4]
    tets_tx4 = (cube_base_c[:, None, None] + corner_off_6x4[None]).reshape(-1, 4)
    return verts_vx3, tets_tx4


def check_grid_res(res: int) -> None:
    """Raise TetGridError unless `res` names a tet grid (an even int >= 2)."""
    if isinstance(res, bool) or not isinstance(res, (int, np.integer)) or res < 2 or res % 2:
        raise TetGridError(
            f"tet_grid: argument 'res' (dmtet_grid) must be an even integer >= 2 "
            f"(the grid has res/2 cells per axis); got {res!r}")


def tet_cell(res: int, mesh_scale: float) -> float:
    """Edge of one grid cube in world units: the grid spans mesh_scale with res/2 cells per axis."""
    return mesh_scale / (res / 2)


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
    check_grid_res(res)
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
