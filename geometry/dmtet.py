"""DMTet: an SDF and a vertex deformation on a tet grid, both predicted by a hash-grid MLP, and
its surface by marching tets (docs/DESIGN.md, "Conventions and formulas").

DMTetGeometry implements the geometry phase's SurfaceGeometry interface (geometry/base.py) and is
registered as "dmtet". The tet grid is geometry/tet_grid.py's; the extraction, its buffers and
the sign-change regularizer on the crossing edges are geometry/marching_tets.py's. Here are the
network evaluation around them and the sealed-air regularizer (a search over the grid's SDF).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from scipy import ndimage

from geometry.base import CountsReport, EmptyMeshError, SealedAirTerm, SurfaceGeometry
from geometry.hashgrid import HashGridOptions
from geometry.marching_tets import (CapacityPlanner, PaddedSurface, SurfaceCapacity, classify, edge_ends,
                                    edge_vertices, marching_tets, pad_faces, raise_nonfinite, surface_topology)
from geometry.registry import register
from geometry.sdf_init import InitShape, pretrain_sdf
from geometry.sdf_net import SDFNetwork
from geometry.tet_grid import TetTopology, check_grid_res, kuhn_cube_tets, tet_cell, tet_grid, tet_topology
from render.util import gather_rows

# Buffers of the tet grid that checkpoints written by earlier versions hold (now rebuilt from grid_res).
GRID_BUFFERS = ("grid_verts", "tets", "edges")

# ----------------------------------------------------------------------------------------------
# Sealed air
# ----------------------------------------------------------------------------------------------

def _kuhn_stencil() -> np.ndarray:
    """[3, 3, 3] bool: the lattice offsets joined by an edge of a Kuhn tet (and the centre): the
    axes, the diagonals e_i + e_j and e_x + e_y + e_z, each both ways (14 neighbours)."""
    offsets = {tuple(b - a) for tet in kuhn_cube_tets() for a in tet for b in tet}   # includes (0, 0, 0)
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
    check_grid_res(grid_res)
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

@register("dmtet")
class DMTetGeometry(SurfaceGeometry):
    """SDF + deformation on a tet grid, both predicted by a hash-grid MLP
    (docs/DESIGN.md, "Conventions and formulas").

    vertices = grid * mesh_scale + (1 / grid_res) * tanh(deform); the network is evaluated at the
    undeformed grid vertices, normalized to the grid's AABB [-0.5, 0.5]^3 * mesh_scale.

    Training state beside the weights: `planner` (the sizes of extract_padded's buffers, reset on
    a new grid) and the sealed-air vertices of the last search.
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
        # Training extracts into fixed-size buffers, so the host never waits for the surface's
        # size; the phase reads the sizes one step late (read_counts) to resize them.
        self.planner = CapacityPlanner()
        # ((search, grid_res), [R] int64 grid vertex ids) of the last sealed-air search.
        self._sealed: tuple[tuple[int, int], torch.Tensor] | None = None

    def _register_grid(self, grid_res: int, device: torch.device) -> None:
        verts, tets = tet_grid(grid_res, self.cache_dir)
        self.grid_res = grid_res
        # The grid follows from grid_res (in training_state), so checkpoints leave it out: at grid
        # 256 it would be 650 of a checkpoint's 800 MB, written at every save_interval.
        self.register_buffer("grid_verts", torch.from_numpy(verts).to(device) * self.mesh_scale, persistent=False)
        self.register_buffer("tets", torch.from_numpy(tets).to(device), persistent=False)
        topo = tet_topology(self.tets)
        self.register_buffer("edges", topo.edges, persistent=False)
        self.register_buffer("tet_edge_ids", topo.tet_edges, persistent=False)

    # ---- setup per iteration -----------------------------------------------------------------
    def set_grid(self, grid_res: int) -> None:
        """Sample the same SDF network on another tet grid (the network is a function of position,
        so nothing is learned again); no-op at the current resolution. A new grid's buffers are
        sized afresh from its first surface."""
        if int(grid_res) != self.grid_res:
            self._register_grid(int(grid_res), self.grid_verts.device)
            self.planner = CapacityPlanner()

    @property
    def n_levels(self) -> int:
        return self.sdf_net.n_levels

    @property
    def active_levels(self) -> int:
        return self.sdf_net.active_levels

    def set_active_levels(self, k: int) -> None:
        self.sdf_net.set_active_levels(k)

    def pretrain(self, shape: InitShape, iters: int, seed: int) -> float:
        return pretrain_sdf(self, shape, iters=iters, seed=seed)

    # ---- the network on the grid -------------------------------------------------------------
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

    # ---- training surface --------------------------------------------------------------------
    def extract_padded(self, planner: CapacityPlanner | None = None) -> PaddedSurface:
        """The surface in fixed-size buffers sized by `planner` (default: this geometry's own, the
        one training uses), without a host read (except the planner's first call); feed
        ``counts`` (read later) to ``read_counts`` (or ``planner.update``).

        The same surface and gradients as marching_tets_padded on every grid vertex, cheaper: the
        signs at every vertex come from a forward pass without gradients, and the network runs
        again, with gradients, only at the ends of the crossing edges (the output vertices depend
        on nothing else), so the backward covers ~1 in 5 of the grid's vertices at grid 128 and
        ~1 in 10 at grid 256 instead of all of them.
        """
        planner = self.planner if planner is None else planner
        with torch.no_grad():
            sdf_all, deform_all = self.sdf_and_deform()                          # [V], [V, 3]
        if planner.capacity is None:   # the one host read: nothing to size the buffers from yet
            counts = classify(sdf_all, self.tets, self.topology, self.classify_backend).counts.tolist()
            self.check_counts(counts)
            planner.update(counts)
        st = surface_topology(sdf_all, self.tets, self.topology, planner.capacity, self.classify_backend)
        ends, slot_a, slot_b, ends_ok, n_ends = edge_ends(st.ia, st.ib, st.v_ok, self.grid_verts.shape[0])
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
        verts = edge_vertices(s_a, s_b, p_a, p_b, v_ok)
        # Only when the ends outgrew their buffer (counted, reported late): drop faces that use them
        # (pad faces come out as they went in: the same row gives the same pad vertex).
        faces = pad_faces(st.faces, v_ok[:, 0][st.faces].all(1), v_ok.shape[0])
        return PaddedSurface(verts, faces, torch.cat([st.counts, n_ends.view(1)]), (s_a, s_b), v_ok[:, 0], sdf_all)

    @property
    def capacity(self) -> SurfaceCapacity:
        return self.planner.capacity

    def read_counts(self, counts: Sequence[int], used: Sequence[int], resize: bool) -> CountsReport:
        """PaddedSurface.counts (5: non-finite SDF values, crossing tets, two-triangle tets, crossing
        edges, edge ends) against the SurfaceCapacity the step had (`used`)."""
        self.check_counts(counts)
        if resize:
            self.planner.update(counts)
        had = SurfaceCapacity(*used)
        overflow = None
        if PaddedSurface.overflow(counts, had):
            overflow = (f"the surface outgrew its buffers (crossing tets / two-triangle tets / vertices / edge ends "
                        f"{' / '.join(map(str, counts[1:]))} for buffers of {had.tets} / {had.two} / {had.verts} / "
                        f"{had.verts + 1}); that step rendered it without some triangles. The buffers have been "
                        "enlarged.")
        return CountsReport(faces=counts[1] + counts[2], overflow=overflow)

    def check_counts(self, counts: Sequence[int]) -> None:
        """Raise for host-read PaddedSurface counts of a broken surface: a non-finite SDF
        (ValueError) or no triangles (EmptyMeshError), as extract() does."""
        n_bad, n_act = counts[0], counts[1]
        if n_bad:
            raise_nonfinite(n_bad, self.grid_verts.shape[0])
        if n_act == 0:
            with torch.no_grad():
                sdf = self.sdf_and_deform()[0]
            raise EmptyMeshError(_empty_mesh_message(sdf, self.grid_res, self.mesh_scale))

    # ---- regularizers ------------------------------------------------------------------------
    def sign_change_loss(self, surface: PaddedSurface) -> torch.Tensor:
        return surface.sign_change_loss()

    def sealed_air_term(self, surface: PaddedSurface, search: int) -> SealedAirTerm:
        """Sealed air (``sealed_air``) in `surface`'s grid SDF, pushed a vertex spacing inside: the
        filled region is solid, not a sliver at the threshold. Every rank finds the same vertices
        from the same weights, so nothing is exchanged."""
        key = (search, self.grid_res)
        if self._sealed is None or self._sealed[0] != key:
            self._sealed = (key, self.sealed_air_rows(surface.grid_sdf))
        rows = self._sealed[1]
        if rows.numel() == 0:
            return SealedAirTerm(torch.zeros((), device=rows.device), 0)
        sdf_r = self.sdf_net(self.grid_verts[rows])[0]                          # [R], with gradients
        return SealedAirTerm(sealed_air_loss(sdf_r, tet_cell(self.grid_res, self.mesh_scale)), rows.numel())

    def sealed_air_rows(self, sdf_v: torch.Tensor | None = None) -> torch.Tensor:
        """[R] int64 ids of the grid vertices of sealed air (``sealed_air``) in the current SDF, or in
        `sdf_v` [V] when given (e.g. a PaddedSurface's grid_sdf: no second pass); waits for the device."""
        if sdf_v is None:
            with torch.no_grad():
                sdf_v = self.sdf_and_deform()[0]
        return torch.nonzero(sealed_air(sdf_v, self.grid_res)).squeeze(1)

    # ---- the exact surface -------------------------------------------------------------------
    def extract_with_sdf(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(verts [Nv, 3], faces [Nf, 3] int64, sdf [V]); raises EmptyMeshError without triangles."""
        sdf, deform = self.sdf_and_deform()
        verts, faces = marching_tets(self.deformed_verts(deform), sdf, self.tets, self.topology)
        if faces.shape[0] == 0:
            raise EmptyMeshError(_empty_mesh_message(sdf.detach(), self.grid_res, self.mesh_scale))
        return verts, faces, sdf

    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        verts, faces, _ = self.extract_with_sdf()
        return verts, faces

    # ---- checkpoints -------------------------------------------------------------------------
    def training_state(self) -> dict[str, Any]:
        # The surface buffers' sizes too: a resumed run pads (and so renders) exactly as the straight one.
        cap = self.planner.capacity
        # And the sealed-air rows in use: they were found at the last search, not from these weights.
        sealed = None if self._sealed is None else {"key": list(self._sealed[0]), "rows": self._sealed[1].cpu()}
        return {"geometry": self.state_dict(), "surface_capacity": None if cap is None else list(cap),
                "grid_res": self.grid_res, "sdf_levels": self.sdf_net.active_levels, "sealed_air": sealed}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.set_grid(state.get("grid_res", self.grid_res))   # the grid the buffers were saved on
        # Checkpoints written before the grid was left out of them carry it: rebuilt above instead.
        saved = {k: v for k, v in state["geometry"].items() if k not in GRID_BUFFERS}
        self.load_state_dict(saved)
        self.sdf_net.set_active_levels(state.get("sdf_levels", self.sdf_net.n_levels))
        cap = state.get("surface_capacity")          # absent in checkpoints written before it existed
        self.planner.capacity = None if cap is None else SurfaceCapacity(*cap)
        sealed = state.get("sealed_air")             # absent before it existed: searched afresh
        self._sealed = None if sealed is None else (tuple(sealed["key"]), sealed["rows"].to(self.grid_verts.device))


def _empty_mesh_message(sdf_v: torch.Tensor, grid_res: int, mesh_scale: float) -> str:
    lo, hi = float(sdf_v.min()), float(sdf_v.max())
    if lo >= 0:
        state = f"every grid vertex is outside (sdf >= 0, min {lo:.4g}): the shape vanished"
    else:
        state = f"every grid vertex is inside (sdf < 0, max {hi:.4g}): the shape fills the grid"
    return (f"marching tets produced no triangles on the tet grid {grid_res} "
            f"(mesh_scale={mesh_scale}): {state}. Likely fixes: with Stable Diffusion guidance, lower "
            "'guidance_weight' (SDS too strong destroys the shape early); check that "
            "'sdf_init_shape_scale', 'translation_y' and 'translation_z' put the initial shape inside "
            "the grid box [-0.5, 0.5]^3 * mesh_scale and that 'mesh_scale' is large enough to contain "
            "it; make sure the SDF pretraining ran (sdf_init_iter > 0).")
