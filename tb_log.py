"""TensorBoard view of a run: the log.jsonl scalars, validation grids, the turntable and the mesh.

log.jsonl stays the machine-readable record; this mirrors it into `run_dir/tensorboard` so a run
can be watched live (`tensorboard --logdir out`). Only rank 0 writes. The `tensorboard` config key
chooses: auto (on when the package is installed), on (a config error when it is not), off.

Imported by the trainer only: it loads torch and trimesh. The config-time check of tensorboard=on
(the package is installed) is preflight.check_tensorboard's, which imports neither.
"""
from __future__ import annotations

import atexit
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import trimesh

from config import ConfigError

# The tensorboard package is optional: tensorboard=auto logs only where torch's SummaryWriter
# imports; under tensorboard=on its import error is the reason given (open_for_run).
try:
    from torch.utils.tensorboard import SummaryWriter
except ImportError as _error:
    SummaryWriter = None
    _import_error: ImportError | None = _error
else:
    _import_error = None

SUBDIR = "tensorboard"
MESH_SUFFIXES = (".glb", ".obj")      # exported files the mesh plugin can show, preferred first


@dataclass(frozen=True)
class TensorBoardOptions:
    turntable_frames: int = 8         # turntable frames shown as one image grid (no video encoder needed)
    flush_secs: int = 10              # a live run shows up within this many seconds


def installed() -> bool:
    """True when torch's SummaryWriter (which needs the tensorboard package) imported."""
    return SummaryWriter is not None


def enabled(mode: str) -> bool:
    return mode == "on" or (mode == "auto" and installed())


def open_for_run(mode: str, run_dir: Path, is_main: bool = True,
                 opts: TensorBoardOptions = TensorBoardOptions()) -> "TensorBoardLog":
    """The run's logger: writing under run_dir/tensorboard, or a no-op one (off, missing under auto,
    rank > 0). tensorboard=on with a package that fails to import is a ConfigError saying why
    (preflight has stopped a run where it is not installed at all)."""
    if is_main and mode == "on" and not installed():
        raise ConfigError(f"tensorboard=on needs the tensorboard package, which does not import ({_import_error}): "
                          "pip install tensorboard, or set tensorboard=auto (or off)")
    if not (is_main and enabled(mode)):
        return TensorBoardLog(None, opts)
    log_dir = Path(run_dir) / SUBDIR
    print(f"tensorboard: logging to {_shown(log_dir)} (view: tensorboard --logdir {_shown(Path(run_dir).parent)})",
          flush=True)
    return TensorBoardLog(log_dir, opts)


def _shown(path: Path) -> str:
    """A path as the user would type it: relative to the working directory when inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve())) or "."
    except ValueError:
        return str(path)


class TensorBoardLog:
    """Writes one run's TensorBoard events; every method is a no-op when `log_dir` is None."""

    def __init__(self, log_dir: Path | None, opts: TensorBoardOptions = TensorBoardOptions()) -> None:
        self.log_dir, self.opts = log_dir, opts
        self._writer: Any = None

    @property
    def active(self) -> bool:
        return self.log_dir is not None

    def _get_writer(self, it: int) -> Any:
        """Opened at the first write. purge_step: after a resume from an earlier checkpoint, TensorBoard
        hides the abandoned run's values from this iteration on, as the continued run replaces them."""
        if self._writer is None:
            self._writer = SummaryWriter(str(self.log_dir), purge_step=it, flush_secs=self.opts.flush_secs)
            atexit.register(self.close)   # a run that fails still leaves its events on disk
        return self._writer

    # -------------------------------------------------------------------------------------- writers
    def log_scalars(self, it: int, record: dict[str, Any]) -> None:
        """Every numeric field of a log.jsonl record: numbers (and booleans, as 0/1) as scalars under
        their own names, lists of numbers (e.g. azimuth_deg) as histograms."""
        if not self.active:
            return
        writer = self._get_writer(it)
        for key, value in record.items():
            if key == "it":
                continue
            if _is_number(value):
                writer.add_scalar(key, float(value), it)
            elif isinstance(value, (list, tuple)):
                flat = list(_flatten(value))
                if flat and all(_is_number(x) for x in flat):
                    writer.add_histogram(key, _as_array(flat), it)

    def log_images(self, it: int, name: str, image: Any) -> None:
        """One image [H, W, C] or several [N, H, W, C] (shown as a grid), uint8 or floats in [0, 1]."""
        if not self.active:
            return
        writer = self._get_writer(it)
        if getattr(image, "ndim", 0) == 4:
            writer.add_images(name, image, it, dataformats="NHWC")
        else:
            writer.add_image(name, image, it, dataformats="HWC")

    def log_validation(self, it: int, images: dict[str, Any]) -> None:
        """The save point's validation views {name: [4, H, W, C]}, side by side as in validation/*.png."""
        if not self.active:
            return
        for name, views in images.items():
            self.log_images(it, f"validation/{name}", np.concatenate(list(views), axis=1))

    def log_turntable(self, it: int, frames: Any) -> None:
        """A few evenly spaced frames of the final turntable [N, H, W, 3], as one grid image."""
        if not self.active or len(frames) == 0:
            return
        count = min(len(frames), self.opts.turntable_frames)
        picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
        self.log_images(it, "turntable", np.asarray(frames)[picks])

    def log_mesh(self, it: int, exported: Iterable[str | os.PathLike]) -> None:
        """The exported surface in the mesh plugin: the GLB (else the OBJ) among `exported`, coloured by
        its albedo texture when it has one (appearance), else by its normals (geometry)."""
        if not self.active:
            return
        path = _pick_mesh(exported)
        if path is None:
            return
        vertices, faces, colors = _mesh_arrays(path)
        self._get_writer(it).add_mesh("mesh", vertices=vertices[None], faces=faces[None], colors=colors[None],
                                      global_step=it)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            atexit.unregister(self.close)


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    # NaN and inf are kept: a diverging loss should show in TensorBoard as it does in log.jsonl.
    return isinstance(value, (int, float))


def _flatten(value: Any) -> Iterable[Any]:
    for x in value:
        if isinstance(x, (list, tuple)):
            yield from _flatten(x)
        else:
            yield x


def _as_array(values: Sequence[float]) -> Any:
    return np.asarray(values, dtype=np.float64)


def _pick_mesh(exported: Iterable[str | os.PathLike]) -> Path | None:
    paths = [Path(p) for p in exported]
    for suffix in MESH_SUFFIXES:
        for p in paths:
            if p.suffix.lower() == suffix and p.is_file():
                return p
    return None


def _mesh_arrays(path: Path) -> tuple[Any, Any, Any]:
    """(vertices [V, 3] float32, faces [F, 3] int32, colors [V, 3] uint8) of a mesh file."""
    mesh = trimesh.load(str(path), force="mesh", process=False)
    vertices = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int32)
    colors = _texture_colors(mesh)
    if colors is None:
        normals = np.asarray(mesh.vertex_normals, dtype=np.float32)
        colors = ((normals + 1) * 127.5).round().clip(0, 255).astype(np.uint8)
    return vertices, faces, colors


def _texture_colors(mesh: Any) -> Any | None:
    """Per-vertex albedo sampled from the mesh's base-colour texture; None when it has none."""
    visual = mesh.visual
    material = getattr(visual, "material", None)
    image = getattr(material, "image", None) or getattr(material, "baseColorTexture", None)
    if image is None or getattr(visual, "uv", None) is None:
        return None
    try:
        colors = visual.to_color().vertex_colors
    except (ValueError, IndexError, AttributeError) as e:   # a texture trimesh cannot sample
        print(f"warning: tensorboard mesh: albedo not sampled from {_file_name(mesh)} ({e}); "
              "showing normals", file=sys.stderr)
        return None
    return np.asarray(colors, dtype=np.uint8)[:, :3]


def _file_name(mesh: Any) -> str:
    return str(mesh.metadata.get("file_name", "the mesh"))
