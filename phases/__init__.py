"""The training phases: geometry (DMTet by SDS on normal renders) and appearance (a PBR material
on a fixed mesh). `build_phase` picks one by the config's mode; the loop is trainer.py's.

Modules: base (the Phase interface and shared helpers), geometry, appearance. Imports flow
trainer -> phases -> guidance, geometry, render (docs/DESIGN.md, "Modules and imports").
"""
from __future__ import annotations

from pathlib import Path

import distributed
from config import Config
from geometry.base import EmptyMeshError
from geometry.hashgrid import HashGridBackendError
from geometry.registry import UnknownGeometryError
from geometry.sdf_init import SdfInitError
from guidance.base import GuidanceInputError
from guidance.registry import UnknownGuidanceError
from phases.appearance import AppearancePhase
from phases.base import Phase, StepResult
from phases.geometry import GeometryPhase
from render import raster
from render.cuda_graph import CudaGraphCaptureError
from render.light import EnvMapError
from render.mesh import MeshError
from run_status import TrainingError
from model_files import ModelNotFoundError
from sd import GuidanceOptionsError

PHASES = {"geometry_modeling": GeometryPhase, "appearance_modeling": AppearancePhase}   # by config mode

# Exceptions whose message is written for the user: printed as one line, exit code 1.
USER_ERRORS: tuple[type[BaseException], ...] = (
    TrainingError, EmptyMeshError, SdfInitError, EnvMapError, MeshError, ModelNotFoundError, GuidanceOptionsError,
    raster.RasterBackendError, CudaGraphCaptureError, HashGridBackendError, GuidanceInputError,
    UnknownGuidanceError, UnknownGeometryError)


def build_phase(cfg: Config, info: distributed.DistInfo, run_dir: Path) -> Phase:
    return PHASES[cfg.mode](cfg, info, run_dir)


__all__ = ["AppearancePhase", "GeometryPhase", "Phase", "PHASES", "StepResult", "USER_ERRORS", "build_phase"]
