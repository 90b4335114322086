"""The surface representation interface (geometry/base.py): a second representation is a class
plus a registration, and the geometry phase trains it with nothing else changed.

The toy representation here is an analytic sphere, sdf(x) = |x| - r with one learned radius,
whose surface is a fixed octahedron subdivision scaled by r: no grid search, a trivial extraction.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pytest
import torch
import trimesh
from torch import nn

import distributed
from config import build_config
from geometry import registry
from geometry.base import CountsReport, EmptyMeshError, SealedAirTerm, SurfaceGeometry, make_geometry
from geometry.dmtet import DMTetGeometry
from geometry.sdf_init import InitShape
from phases.geometry import GeometryPhase, sdf_regularizer_weight
from trainer import Trainer, make_generators

TOY = "toy_sphere"


class SphereSurface(NamedTuple):
    verts: torch.Tensor         # [V + 1, 3]: the sphere's vertices, then one fill row at the origin
    faces: torch.Tensor         # [F + 1, 3] int64: the sphere's faces, then one pad face (q, q, q)
    counts: torch.Tensor        # [1] int64: the true face count F


class ToySphere(SurfaceGeometry):
    """sdf(x) = |x| - radius; the surface is an icosphere scaled to the radius."""

    N_LEVELS = 3                # pretend hash-grid levels, so the phase's level schedule has work

    def __init__(self, grid_res: int, mesh_scale: float, backend: str = "auto", encoder_opts: object = None,
                 device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.grid_res, self.mesh_scale = grid_res, mesh_scale
        self.radius = nn.Parameter(torch.tensor(0.2 * mesh_scale, device=device))
        ico = trimesh.creation.icosphere(subdivisions=1)
        self.register_buffer("unit_verts", torch.tensor(np.asarray(ico.vertices), dtype=torch.float32, device=device))
        self.register_buffer("unit_faces", torch.tensor(np.asarray(ico.faces), dtype=torch.int64, device=device))
        self._levels = self.N_LEVELS
        self.searches: list[int] = []           # the `search` counters sealed_air_term was given

    def set_grid(self, grid_res: int) -> None:
        self.grid_res = int(grid_res)

    @property
    def n_levels(self) -> int:
        return self.N_LEVELS

    @property
    def active_levels(self) -> int:
        return self._levels

    def set_active_levels(self, k: int) -> None:
        if not 1 <= k <= self.N_LEVELS:
            raise ValueError(f"set_active_levels: expected 1..{self.N_LEVELS}; got {k}")
        self._levels = k

    def pretrain(self, shape: InitShape, iters: int, seed: int) -> float:
        """Least squares radius of the shape's surface samples (the sphere's SDF fit in one go)."""
        distances = np.linalg.norm(shape.sample_surface(256, np.random.default_rng(seed)), axis=1)
        with torch.no_grad():
            self.radius.fill_(float(distances.mean()))
        return float(distances.var())

    def extract_padded(self) -> SphereSurface:
        verts = torch.cat([self.unit_verts * self.radius, self.unit_verts.new_zeros(1, 3)])
        n_faces = self.unit_faces.shape[0]
        pad = torch.full((1, 3), n_faces % verts.shape[0], dtype=torch.int64, device=verts.device)
        faces = torch.cat([self.unit_faces, pad])
        return SphereSurface(verts, faces, torch.tensor([n_faces], device=verts.device))

    @property
    def capacity(self) -> tuple[int, ...]:
        return (self.unit_faces.shape[0] + 1,)

    def read_counts(self, counts: Sequence[int], used: Sequence[int], resize: bool) -> CountsReport:
        if counts[0] == 0:
            raise EmptyMeshError("the toy sphere has no faces")
        overflow = None if counts[0] <= used[0] else f"{counts[0]} faces for a buffer of {used[0]}"
        return CountsReport(faces=counts[0], overflow=overflow)

    def sign_change_loss(self, surface: SphereSurface) -> torch.Tensor:
        return (self.radius - 0.5).square()           # anything differentiable: the phase only weights it

    def sealed_air_term(self, surface: SphereSurface, search: int) -> SealedAirTerm:
        self.searches.append(search)
        return SealedAirTerm(torch.zeros((), device=self.radius.device), 0)   # a sphere seals no air

    def extract(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.unit_verts * self.radius, self.unit_faces

    def training_state(self) -> dict[str, Any]:
        return {"weights": self.state_dict(), "levels": self._levels, "grid_res": self.grid_res}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.load_state_dict(state["weights"])
        self.set_grid(state["grid_res"])
        self.set_active_levels(state["levels"])


@pytest.fixture
def toy_registered():
    registry.register(TOY)(ToySphere)
    yield TOY
    registry.unregister(TOY)


def test_registry_names_builds_and_refuses() -> None:
    assert registry.DEFAULT == "dmtet" and "dmtet" in registry.names()
    geo = make_geometry("dmtet", grid_res=8, mesh_scale=2.0, backend="torch")
    assert isinstance(geo, DMTetGeometry) and isinstance(geo, SurfaceGeometry)
    with pytest.raises(registry.UnknownGeometryError, match="did you mean 'dmtet'"):
        make_geometry("dmtett", grid_res=8, mesh_scale=2.0)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("dmtet")(ToySphere)
    with pytest.raises(ValueError, match="built in"):
        registry.unregister("dmtet")


def test_an_incomplete_or_foreign_class_is_refused() -> None:
    class Half(SurfaceGeometry):   # implements nothing
        pass

    with pytest.raises(TypeError, match="abstract"):
        Half()
    registry.register("not_a_surface")(dict)
    try:
        with pytest.raises(TypeError, match="SurfaceGeometry subclass"):
            make_geometry("not_a_surface", grid_res=8, mesh_scale=2.0)
    finally:
        registry.unregister("not_a_surface")


def test_the_phase_trains_a_registered_toy_representation(tmp_path: Path, toy_registered: str) -> None:
    """Pretraining, two training steps through the trainer (the second on another grid and with
    all levels), the log record, a checkpoint state round trip and the exported mesh."""
    cfg = build_config({
        "mode": "geometry_modeling", "geometry": toy_registered, "guidance": "target_mesh", "target_mesh": "data/meshes/bunny_like.obj",
        "device": "cpu", "train_res": [32, 32], "batch": 1, "iter": 2, "coarse_iter": 1, "sdf_init_iter": 1,
        "dmtet_grid": 16, "dmtet_grid_coarse": 8, "sdf_levels_coarse": 1, "sdf_levels_ramp": 0,
        "sdf_regularizer": 0.1, "laplacian_smoothness": 0.1, "sealed_air": 1.0, "mesh_scale": 2.0,
        "validate": False, "video_frames": 0, "tensorboard": "off", "out_dir": str(tmp_path)})
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    phase = GeometryPhase(cfg, info, tmp_path)
    assert isinstance(phase.geo, ToySphere)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # the single-GPU camera sector advice
        trainer = Trainer(cfg, info, phase, tmp_path, make_generators(cfg.seed, info))
    phase.prepare(resumed=False)
    assert phase.geo.active_levels == 1 and phase.pretrain_mse is not None
    radius = phase.geo.radius.item()

    first = trainer.finish_step(trainer.train_step(1))
    assert (phase.geo.grid_res, phase.geo.active_levels) == (8, 1)
    second = trainer.finish_step(trainer.train_step(2))
    assert (phase.geo.grid_res, phase.geo.active_levels) == (16, ToySphere.N_LEVELS)
    for record in (first, second):
        assert record["faces"] == 80 and np.isfinite(record["loss"]) and not record["skipped"]
        assert {"sdf_reg", "sealed_air", "sealed_air_vertices", "laplacian_smoothness"} <= set(record)
    assert phase.geo.radius.item() != radius                     # the optimizer moved the parameter
    assert phase.geo.searches == [0, 0]                          # iterations 1 and 2: one search round

    state = phase.state_dict()
    other = GeometryPhase(cfg, info, tmp_path)
    other.load_state_dict(state)
    assert torch.equal(other.geo.radius, phase.geo.radius) and other.geo.grid_res == 16
    files = phase.export(tmp_path)
    assert all(f.exists() for f in files)


def test_sdf_regularizer_weight_follows_nvdiffrec_schedule() -> None:
    assert sdf_regularizer_weight(0.2, 0, 1000) == 0.2
    assert sdf_regularizer_weight(0.2, 125, 1000) == pytest.approx(0.2 - 0.19 / 2)     # half way down
    assert sdf_regularizer_weight(0.2, 250, 1000) == pytest.approx(0.01)                # 1/20 at a quarter
    assert sdf_regularizer_weight(0.2, 1000, 1000) == pytest.approx(0.01)               # then constant
