"""From the form to train.py command lines: the keys people change, checked extra keys, and the
settings only the app decides (where runs are written, the model, the device)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import config as C
from webapp.recipes import Recipe

# Keys the form never accepts: they name files or folders on the server (the app chooses where runs
# are written and takes meshes as uploads), or they are fixed when the app starts.
PATH_KEYS = frozenset({"out_dir", "sd_model", "display"} |
                      {f.name for f in dataclasses.fields(C.Config) if f.metadata["check"] is C.path_or_none})
APP_KEYS = frozenset({"device", "mode"})


class RequestError(ValueError):
    """The form asks for something the app refuses or the config rejects; shown to the user as is."""


@dataclass(frozen=True)
class ServerSettings:
    """Set on the app's command line, never from the page."""
    runs_dir: Path                     # every run folder is made under it
    sd_model: str | None = None        # None: each config's own sd_model
    device: str | None = None          # None: each config's own device


@dataclass
class RunRequest:
    """The form. Blank fields (None, "") keep the config's value."""
    recipe: str
    prompt: str = ""
    negative_prompt: str = ""
    seed: int | None = None
    guidance_weight: float | None = None
    iterations: int | None = None
    grid: int | None = None
    extra: str = ""                    # more keys, one key=value per line
    mesh: Path | None = None           # the checked upload, already inside the job's upload folder


@dataclass(frozen=True)
class Step:
    """One train.py run of a job."""
    name: str                          # "geometry" or "appearance": also its run folder's name
    config: Path
    overrides: tuple[str, ...]
    run_dir: Path

    def command(self, python: str) -> list[str]:
        return [python, "-u", "train.py", "--config", str(self.config), *self.overrides]


def parse_extra(text: str) -> list[tuple[str, Any]]:
    """`key=value` lines (values as on train.py's command line); path-like and app-set keys refused."""
    pairs = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            key, value = C.parse_override(line.strip())
        except C.ConfigError as e:
            raise RequestError(str(e)) from None
        _refuse(key)
        pairs.append((key, value))
    return pairs


def _refuse(key: str) -> None:
    if key in PATH_KEYS:
        raise RequestError(f"refused: '{key}' names a file or folder on the server; the app chooses where runs are "
                           "written, and a mesh comes in as an upload")
    if key in APP_KEYS:
        raise RequestError(f"refused: '{key}' is set by the chosen config or when the app starts")


def _form_values(req: RunRequest, mode: str, file_values: dict[str, Any]) -> list[tuple[str, Any]]:
    """The form's fields as config keys; iterations keep the config's coarse/fine split."""
    pairs: list[tuple[str, Any]] = []
    for key, value in (("text", req.prompt.strip()), ("negative_text", req.negative_prompt.strip()),
                       ("seed", req.seed), ("guidance_weight", req.guidance_weight)):
        if value not in (None, ""):
            pairs.append((key, value))
    if req.iterations is not None:
        total = int(file_values.get("iter", C.Config.iter))
        coarse = int(file_values.get("coarse_iter", C.Config.coarse_iter))
        pairs += [("iter", int(req.iterations)), ("coarse_iter", round(coarse * int(req.iterations) / total))]
    if req.grid is not None and mode == "geometry_modeling":
        pairs.append(("dmtet_grid", int(req.grid)))
    return pairs


def _mesh_values(req: RunRequest, mode: str, index: int, previous: Step | None) -> list[tuple[str, Any]]:
    """Which mesh a step starts from: the previous step's export, else the upload (fine-tuned by
    geometry, textured by appearance), else the config's own."""
    if previous is not None and mode == "appearance_modeling":
        return [("base_mesh", str(previous.run_dir / "dmtet_mesh" / "mesh.obj"))]
    if req.mesh is None or index > 0:
        return []
    if mode == "geometry_modeling":
        return [("sdf_init_shape", "custom_mesh"), ("base_mesh", str(req.mesh))]
    return [("base_mesh", str(req.mesh))]


def _server_values(server: ServerSettings, run_dir: Path) -> list[tuple[str, Any]]:
    pairs: list[tuple[str, Any]] = [("out_dir", str(run_dir))]
    if server.sd_model:
        pairs.append(("sd_model", server.sd_model))
    if server.device:
        pairs.append(("device", server.device))
    return pairs


def plan_steps(req: RunRequest, recipe: Recipe, job_dir: Path, server: ServerSettings) -> list[Step]:
    """The job's train.py runs, each checked against the config schema now, so a bad value is
    reported before the job queues (files are checked by train.py when the step starts)."""
    extra = parse_extra(req.extra)
    steps: list[Step] = []
    for index, (path, mode) in enumerate(zip(recipe.configs, recipe.modes)):
        name = "geometry" if mode == "geometry_modeling" else "appearance"
        run_dir = job_dir / name
        pairs = [*_form_values(req, mode, C.read_json(path)), *extra,
                 *_mesh_values(req, mode, index, steps[-1] if steps else None), *_server_values(server, run_dir)]
        overrides = tuple(f"{k}={json.dumps(v)}" for k, v in pairs)
        try:
            C.load_config(path, list(overrides))
        except C.ConfigError as e:
            raise RequestError(str(e)) from None
        steps.append(Step(name, path, overrides, run_dir))
    return steps
