"""Fixed-mesh geometry for the appearance phase: the surface is given, only materials learn."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from render.mesh import Mesh, compute_tangents, compute_vertex_normals, load_mesh, unit_size
from render.uv import unwrap

log = logging.getLogger(__name__)


class FixedMeshGeometry(nn.Module):
    """A loaded mesh with normals, UVs and tangents, plus the AABB for the material encoder.

    - normals: kept from the file when present, else area-weighted vertex normals;
    - UVs: kept when present, else unwrapped with xatlas (logged, since the bake depends on it);
    - tangents: always recomputed from the UVs (needed by the tangent-space normal perturbation).
    `normalize=True` centres and scales the mesh into the unit sphere (for arbitrary user meshes;
    meshes written by the geometry phase are already in world units and must not be moved).
    """

    def __init__(self, mesh: Mesh | str | Path, device: torch.device | str = "cpu",
                 normalize: bool = False) -> None:
        super().__init__()
        source = str(mesh) if isinstance(mesh, (str, Path)) else "the given Mesh"
        m = load_mesh(mesh) if isinstance(mesh, (str, Path)) else mesh.to("cpu")
        if normalize:
            m = unit_size(m)
        if m.v_nrm is None or m.t_nrm_idx is None:
            m = compute_vertex_normals(m)
        if m.v_tex is None or m.t_tex_idx is None:
            log.info("mesh %s has no UVs: unwrapping with xatlas (%d faces)", source,
                     m.t_pos_idx.shape[0])
            m = unwrap(m)
            self.unwrapped = True
        else:
            self.unwrapped = False
        self._mesh = compute_tangents(m).to(device)
        self.source = source

    def mesh(self) -> Mesh:
        return self._mesh

    @property
    def aabb(self) -> torch.Tensor:
        """[2, 3] (min, max) of the vertex positions, padded where flat so the encoder's
        normalization never divides by zero (a planar mesh is a valid appearance target)."""
        lo, hi = self._mesh.aabb()
        pad = torch.clamp(1e-3 * (hi - lo).max() - (hi - lo), min=0.0) / 2
        return torch.stack([lo - pad, hi + pad])
