"""UV unwrapping with xatlas.

The unwrapped mesh keeps its positions, position indices and normals; only the UV stream
(`v_tex [Vt, 2]`, `t_tex_idx [F, 3]`) is replaced. UVs follow the OBJ convention of
`render.mesh` (origin bottom-left). Old tangents are dropped because they were derived from the
old UVs; `render.mesh.compute_tangents` rebuilds them from the new ones.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace

import numpy as np
import torch
import xatlas

import progress
from render.mesh import Mesh, MeshError, face_component_labels, validate_mesh


# Meshes from this many faces up get a line before and after the unwrap: xatlas is one native
# call that reports no progress, and on a large, noisy surface it takes from seconds to minutes.
ANNOUNCE_FACES = 20_000


class UnwrapError(RuntimeError):
    """xatlas produced something unusable; the message says what and how to change the options."""


@dataclass
class ChartOptions:
    """Subset of xatlas.ChartOptions that matters for our meshes (defaults = xatlas defaults)."""
    max_chart_area: float = 0.0       # 0 = unlimited
    max_boundary_length: float = 0.0  # 0 = unlimited
    normal_deviation_weight: float = 2.0
    roundness_weight: float = 0.01
    straightness_weight: float = 6.0
    normal_seam_weight: float = 4.0
    texture_seam_weight: float = 0.5
    max_cost: float = 2.0             # higher = larger, more distorted charts
    max_iterations: int = 1
    fix_winding: bool = False


@dataclass
class PackOptions:
    """Subset of xatlas.PackOptions.

    `padding` is in texels of a `resolution`-sized atlas; with resolution 0 xatlas picks the atlas
    size itself and the padding is relative to that. Set `resolution` to the bake's texture_res so
    island gaps are exactly `padding` texels in the baked maps.
    """
    padding: int = 2
    resolution: int = 0
    texels_per_unit: float = 0.0      # 0 = derive from resolution
    max_chart_size: int = 0           # 0 = unlimited
    bilinear: bool = True             # leave room for bilinear filtering between charts
    block_align: bool = False
    brute_force: bool = False         # slower, tighter packing
    rotate_charts: bool = True
    rotate_charts_to_axis: bool = True


def _xatlas_options(chart: ChartOptions, pack: PackOptions) -> tuple[object, object]:
    if pack.padding < 0 or pack.resolution < 0 or pack.max_chart_size < 0:
        raise ValueError(f"unwrap: pack_options padding/resolution/max_chart_size must be >= 0, got "
                         f"{pack.padding}/{pack.resolution}/{pack.max_chart_size}")
    x_chart = xatlas.ChartOptions()
    for name, value in vars(chart).items():
        setattr(x_chart, name, value)
    x_pack = xatlas.PackOptions()
    x_pack.padding = pack.padding
    x_pack.resolution = pack.resolution
    x_pack.texels_per_unit = pack.texels_per_unit
    x_pack.max_chart_size = pack.max_chart_size
    x_pack.bilinear = pack.bilinear
    x_pack.blockAlign = pack.block_align
    x_pack.bruteForce = pack.brute_force
    x_pack.rotate_charts = pack.rotate_charts
    x_pack.rotate_charts_to_axis = pack.rotate_charts_to_axis
    return x_chart, x_pack


def unwrap(mesh: Mesh, chart_options: ChartOptions | None = None,
           pack_options: PackOptions | None = None, max_chunk_faces: int = 10_000) -> Mesh:
    """Return a copy of `mesh` with a fresh xatlas UV atlas (one atlas page, uv in [0, 1]^2).

    Meshes with more than `max_chunk_faces` faces are cut into spatially compact pieces of at most
    that many faces, which xatlas charts separately (in parallel) and packs into the one atlas:
    its chart computation grows faster than linearly with a mesh's size (a 165k-face grid-256
    surface took 92 s whole), and the pieces' borders only add chart borders where marching-tets
    surfaces have small charts anyway. 0 charts the mesh whole.

    Faces keep their order, so per-face data of the input stays valid. Raises MeshError for an
    empty/invalid mesh and UnwrapError if xatlas splits the atlas into several pages (the bake
    writes one texture per map) or reorders faces.
    """
    validate_mesh(mesh, "unwrap(mesh)")
    if isinstance(max_chunk_faces, bool) or not isinstance(max_chunk_faces, int) or max_chunk_faces < 0:
        raise ValueError(f"unwrap: max_chunk_faces must be an int >= 0 (0: no chunks), got {max_chunk_faces!r}")
    chart_options = chart_options or ChartOptions()
    pack_options = pack_options or PackOptions()
    x_chart, x_pack = _xatlas_options(chart_options, pack_options)

    pos_vx3 = mesh.v_pos.detach().cpu().numpy().astype(np.float32)
    tri_fx3 = mesh.t_pos_idx.detach().cpu().numpy().astype(np.uint32)
    chunks = _spatial_chunks(pos_vx3[tri_fx3].mean(1), max_chunk_faces or len(tri_fx3))   # face ids per piece
    atlas = xatlas.Atlas()
    piece_verts = []                                                           # each piece's own vertex ids
    for faces in chunks:
        used, local = np.unique(tri_fx3[faces], return_inverse=True)
        atlas.add_mesh(pos_vx3[used], local.reshape(-1, 3).astype(np.uint32))
        piece_verts.append(used)
    announce = len(tri_fx3) >= ANNOUNCE_FACES
    with progress.timed(f"unwrapping UVs with xatlas ({len(tri_fx3)} faces, {len(chunks)} pieces)") if announce \
            else contextlib.nullcontext():
        atlas.generate(x_chart, x_pack)
    if atlas.atlas_count != 1:
        raise UnwrapError(f"unwrap: xatlas produced {atlas.atlas_count} atlas pages, expected 1; "
                          "set pack_options.max_chart_size to 0 or raise pack_options.resolution")
    tex_idx_fx3 = np.empty(tri_fx3.shape, dtype=np.int64)
    uv_parts, n_uv = [], 0
    for i, (faces, used) in enumerate(zip(chunks, piece_verts)):
        vmapping_t, piece_idx_fx3, uv_tx2 = atlas[i]
        # xatlas keeps face order; check it, because baking and tangents rely on face correspondence.
        if piece_idx_fx3.shape != (len(faces), 3) or not np.array_equal(used[vmapping_t[piece_idx_fx3]], tri_fx3[faces]):
            raise UnwrapError(f"unwrap: xatlas output faces do not correspond to the input faces "
                              f"(piece {i}: got {piece_idx_fx3.shape[0]} faces, expected {len(faces)})")
        tex_idx_fx3[faces] = piece_idx_fx3 + n_uv
        uv_parts.append(uv_tx2)
        n_uv += len(uv_tx2)
    device = mesh.v_pos.device
    return replace(
        mesh,
        v_tex=torch.from_numpy(np.concatenate(uv_parts).astype(np.float32)).to(device),  # [Vt, 2] in [0, 1]
        t_tex_idx=torch.from_numpy(tex_idx_fx3).to(device),                             # [F, 3]
        v_tng=None,
        t_tng_idx=None,
    )


def _spatial_chunks(centroids_fx3: np.ndarray, max_faces: int) -> list[np.ndarray]:
    """Face ids cut into compact pieces of at most `max_faces`: halved at the median along the
    longest side of each piece's bounding box until small enough (a k-d tree's leaves)."""
    pieces, todo = [], [np.arange(len(centroids_fx3))]
    while todo:
        ids = todo.pop()
        if len(ids) <= max_faces:
            pieces.append(ids)
            continue
        c = centroids_fx3[ids]
        axis = int(np.argmax(c.max(0) - c.min(0)))
        order = np.argsort(c[:, axis], kind="stable")
        half = len(ids) // 2
        todo += [ids[order[half:]], ids[order[:half]]]
    return pieces


def uv_island_labels(t_tex_idx_fx3: torch.Tensor) -> np.ndarray:
    """Per-face UV island id [F] (connected components of the faces' shared UV vertices)."""
    return face_component_labels(t_tex_idx_fx3.detach().cpu().numpy())


def chart_count(mesh: Mesh) -> int:
    """Number of UV islands (connected components of the UV index graph); for logs and tests."""
    if mesh.t_tex_idx is None:
        raise MeshError("chart_count: mesh has no UVs (t_tex_idx is None); call unwrap() first")
    return int(np.unique(uv_island_labels(mesh.t_tex_idx)).shape[0])
