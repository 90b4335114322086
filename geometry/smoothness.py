"""Mesh smoothness regularizers on the extracted surface (threestudio's `lambda_laplacian_smoothness`
and `lambda_normal_consistency`, as config keys `laplacian_smoothness` and `normal_consistency`).

Both read a surface in the training loop's padded form (geometry.dmtet.PaddedSurface): pad faces
are (q, q, q), so every edge they contribute joins a vertex to itself. Such self-edges are left
out, and vertices with no other edge (the pad rows) are left out of the means. No step here reads
a device value on the host, so the training loop keeps its one-step-late reads.

Edges are taken per face in both directions, without deduplication (which would need a host read
of the unique count). On a closed manifold surface, such as DMTet extracts from an SDF, every
edge belongs to exactly two faces, so each neighbour and each edge is counted the same number of
times and the means equal those over unique edges and neighbours.
"""
from __future__ import annotations

import torch
from torch import Tensor

from render.mesh import face_and_vertex_normals


def _check(verts_vx3: Tensor, faces_fx3: Tensor) -> None:
    if verts_vx3.ndim != 2 or verts_vx3.shape[1] != 3 or not verts_vx3.dtype.is_floating_point:
        raise ValueError(f"verts_vx3: expected a float [V, 3] tensor, got {tuple(verts_vx3.shape)} "
                         f"{verts_vx3.dtype}")
    if faces_fx3.ndim != 2 or faces_fx3.shape[1] != 3 or faces_fx3.dtype.is_floating_point:
        raise ValueError(f"faces_fx3: expected an integer [F, 3] tensor, got {tuple(faces_fx3.shape)} "
                         f"{faces_fx3.dtype}")


def directed_edges(faces_fx3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(i [6F], j [6F], real [6F] bool): each face's three edges in both directions; `real` is
    False for self-edges (pad faces)."""
    f = faces_fx3.long()
    i = torch.cat([f[:, 0], f[:, 1], f[:, 2], f[:, 1], f[:, 2], f[:, 0]])
    j = torch.cat([f[:, 1], f[:, 2], f[:, 0], f[:, 0], f[:, 1], f[:, 2]])
    return i, j, i != j


def laplacian_smoothness(verts_vx3: Tensor, faces_fx3: Tensor) -> Tensor:
    """Mean over surface vertices of |v - mean of its neighbours| (uniform Laplacian; 0-dim).

    The same quantity as threestudio's Mesh.laplacian(): it pulls each vertex towards the
    centroid of its ring, which shrinks ridges, thin plates and spikes fastest (their rings are
    furthest from flat).
    """
    _check(verts_vx3, faces_fx3)
    i, j, real = directed_edges(faces_fx3)
    w = real.to(verts_vx3.dtype)                                                    # [6F]
    degree = torch.zeros(verts_vx3.shape[0], dtype=verts_vx3.dtype, device=verts_vx3.device)
    degree = degree.index_add(0, i, w)                                              # [V]
    neighbour_sum = torch.zeros_like(verts_vx3).index_add(0, i, verts_vx3[j] * w[:, None])   # [V, 3]
    on_surface = degree > 0
    centroid = neighbour_sum / degree.clamp(min=1.0)[:, None]
    offset = torch.where(on_surface[:, None], verts_vx3 - centroid, 0.0)            # [V, 3]
    # Written as sqrt(|x|^2 + tiny) so a vertex exactly at its centroid has a zero gradient, not NaN.
    norm = (offset.pow(2).sum(-1) + 1e-20).sqrt() * on_surface
    return norm.sum() / on_surface.sum().clamp(min=1)


def normal_consistency(verts_vx3: Tensor, faces_fx3: Tensor) -> Tensor:
    """Mean over surface edges of 1 - cos(angle between the unit vertex normals at its ends) (0-dim).

    The same quantity as threestudio's Mesh.normal_consistency(), with area-weighted vertex
    normals (those the geometry renderer shades with): zero on a plane, largest at creases.
    """
    _check(verts_vx3, faces_fx3)
    _, v_nrm = face_and_vertex_normals(verts_vx3, faces_fx3.long())                 # [V, 3] unit
    i, j, real = directed_edges(faces_fx3)
    cos = (v_nrm[i] * v_nrm[j]).sum(-1)                                              # [6F]
    return ((1.0 - cos) * real).sum() / real.sum().clamp(min=1)
