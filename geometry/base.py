"""What the geometry phase needs from a surface representation (DMTet today, FlexiCubes next).

A representation is an nn.Module subclass of SurfaceGeometry registered under a name
(geometry/registry.py) and built by make_geometry. The phase calls exactly the members below:

- setup per iteration: the grid resolution (`grid_res`, `set_grid`) and the number of SDF
  hash-grid levels in use (`n_levels`, `active_levels`, `set_active_levels`);
- `pretrain`: fit the SDF to the initial shape before SDS;
- training: `extract_padded` gives the surface in fixed-size buffers (a Surface) without making
  the host wait for the surface's size; the phase reads the surface's `counts` one step late and
  hands them back to `read_counts`, which checks them and sizes the next step's buffers
  (`capacity`: the sizes a step used, logged beside the counts);
- regularizers: `sign_change_loss` and `sealed_air_term`. Both act on the SDF samples of the
  representation's own grid and its neighbourhoods (tet edges for DMTet, cube edges for a cube
  grid), so each representation implements them; the phase owns their weights and schedules;
- `extract` / `mesh`: the exact surface, for validation images and the exported mesh;
- `training_state` / `load_training_state`: everything a resumed run needs to continue bit for
  bit (weights, buffer sizes, grid, levels, regularizer state), as one checkpoint entry;
- `parameters()` (nn.Module's): the trainable tensors.

Sign convention: sdf < 0 inside; surfaces' triangles wind counter-clockwise seen from outside.
"""
from __future__ import annotations

from abc import ABCMeta, abstractmethod
from typing import Any, NamedTuple, Protocol, Sequence

import torch
from torch import nn

from geometry import registry
from geometry.hashgrid_layout import HashGridOptions
from geometry.sdf_init import InitShape
from render.mesh import Mesh, compute_vertex_normals


class EmptyMeshError(RuntimeError):
    """The representation produced no triangles: the SDF has no zero crossing inside the grid."""


class Surface(Protocol):
    """A training surface in fixed-size buffers (the same shapes from step to step while the
    buffers keep their size, so nothing waits for the host).

    verts:  [Vb, 3] float32 positions with gradients; rows past the true vertex count are fill.
    faces:  [Fb, 3] int64 indices into verts; fill faces are degenerate (q, q, q), which both
            rasterizers draw as nothing.
    counts: [K] int64 on the device: the surface's true sizes (K and meaning per representation),
            read on the host one step late and passed to SurfaceGeometry.read_counts.
    """

    verts: torch.Tensor
    faces: torch.Tensor
    counts: torch.Tensor


class CountsReport(NamedTuple):
    """What a step's host-read counts say (SurfaceGeometry.read_counts)."""
    faces: int                  # triangles of the true surface (also when some did not fit)
    overflow: str | None        # the buffers that were too small, for the warning; None: all fitted


class SealedAirTerm(NamedTuple):
    """The sealed-air regularizer of a step (SurfaceGeometry.sealed_air_term)."""
    loss: torch.Tensor          # 0-dim, with gradients; 0 without sealed air
    vertices: int               # grid samples it acts on


class SurfaceGeometry(nn.Module, metaclass=ABCMeta):
    """A surface representation trained by the geometry phase (see the module docstring).

    Built by ``cls(grid_res=..., mesh_scale=..., backend=..., encoder_opts=..., device=...)``
    (make_geometry): `grid_res` the grid resolution of the first iteration (dmtet_grid),
    `mesh_scale` the side of the cube the surface lives in (centred on the origin), `backend` the
    hash-grid encoder backend ("auto", "torch", "triton", "tcnn") and `encoder_opts` its options
    (HashGridOptions, None: the published ones; representations without a hash grid accept and
    ignore both), `device` where its tensors live.
    """

    grid_res: int               # the resolution of the current grid (set_grid)

    # ---- setup per iteration -----------------------------------------------------------------
    @abstractmethod
    def set_grid(self, grid_res: int) -> None:
        """Sample the surface on a grid of `grid_res` from now on (no-op at the current one); the
        learned fields are functions of position, so nothing is learned again. A new grid also
        sizes the surface buffers afresh."""

    @property
    @abstractmethod
    def n_levels(self) -> int:
        """Hash-grid levels of the SDF network (1 for a representation without one)."""

    @property
    @abstractmethod
    def active_levels(self) -> int:
        """The coarsest levels in use (set_active_levels), 1..n_levels."""

    @abstractmethod
    def set_active_levels(self, k: int) -> None:
        """Use only the `k` coarsest hash-grid levels (1 <= k <= n_levels); ValueError otherwise."""

    # ---- SDF pretraining ---------------------------------------------------------------------
    @abstractmethod
    def pretrain(self, shape: InitShape, iters: int, seed: int) -> float:
        """Fit the SDF to `shape`'s signed distance for `iters` steps from `seed`; returns the
        final mse (a float: the device is synchronized)."""

    # ---- training surface --------------------------------------------------------------------
    @abstractmethod
    def extract_padded(self) -> Surface:
        """The current surface in buffers of `capacity`, with gradients to the parameters; no
        host read except on the first call after construction or a new grid (nothing to size the
        buffers from yet). Raises EmptyMeshError or ValueError (non-finite SDF) only on that read;
        otherwise a broken surface shows in its counts (read_counts)."""

    @property
    @abstractmethod
    def capacity(self) -> tuple[int, ...]:
        """Host ints: the buffer sizes of the last extract_padded (valid after the first call)."""

    @abstractmethod
    def read_counts(self, counts: Sequence[int], used: Sequence[int], resize: bool) -> CountsReport:
        """Take a step's Surface.counts, read on the host one step late, and the `capacity` that
        step had (`used`). Raises EmptyMeshError for a surface without triangles and ValueError for a
        non-finite SDF; with `resize`, sizes the next extract_padded's buffers from the counts (the
        phase passes False for the last step before a grid switch: its counts size nothing)."""

    # ---- regularizers ------------------------------------------------------------------------
    @abstractmethod
    def sign_change_loss(self, surface: Surface) -> torch.Tensor:
        """nvdiffrec's SDF regularizer (0-dim, with gradients): BCE pushing the two SDF samples of
        every grid edge that crosses the surface of this step's `surface` towards each other's
        sign, which removes floaters and internal sheets that no view sees."""

    @abstractmethod
    def sealed_air_term(self, surface: Surface, search: int) -> SealedAirTerm:
        """Pushes grid samples of air sealed inside the solid (outside samples that no path of
        outside samples joins to the grid's boundary: no camera sees them) to the inside. The
        sealed samples are searched in this step's `surface` whenever `search` (a counter the
        phase advances every few iterations: a search waits for the device) or the grid changes;
        in between the last search's samples are used."""

    # ---- the exact surface -------------------------------------------------------------------
    @abstractmethod
    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(verts [Nv, 3] float32, faces [Nf, 3] int64) at their exact sizes (one host read);
        raises EmptyMeshError without triangles."""

    def mesh(self, with_normals: bool = True) -> Mesh:
        """The current surface as a render.mesh.Mesh (area-weighted vertex normals by default)."""
        verts, faces = self.extract()
        m = Mesh(v_pos=verts, t_pos_idx=faces, v_nrm=None, t_nrm_idx=None, v_tex=None,
                 t_tex_idx=None, v_tng=None, t_tng_idx=None, material=None)
        return compute_vertex_normals(m) if with_normals else m

    # ---- checkpoints -------------------------------------------------------------------------
    @abstractmethod
    def training_state(self) -> dict[str, Any]:
        """Everything a resumed run needs to continue exactly as the straight run (the weights
        and whatever steers the next steps); torch.save-able, on any device."""

    @abstractmethod
    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore a training_state (also one saved by an older version of the representation)."""


def make_geometry(name: str, *, grid_res: int, mesh_scale: float, backend: str = "auto",
                  encoder_opts: HashGridOptions | None = None, device: torch.device | str = "cpu") -> SurfaceGeometry:
    """The representation registered as `name` (geometry/registry.py), built with the arguments
    SurfaceGeometry documents. Raises UnknownGeometryError for an unknown name and TypeError for a
    registered class that is not a SurfaceGeometry."""
    cls = registry.geometry_class(name)
    if not (isinstance(cls, type) and issubclass(cls, SurfaceGeometry)):
        raise TypeError(f"make_geometry: geometry {name!r} must be registered as a SurfaceGeometry subclass "
                        f"(geometry/base.py); got {cls!r}")
    return cls(grid_res=grid_res, mesh_scale=mesh_scale, backend=backend, encoder_opts=encoder_opts, device=device)
