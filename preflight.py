"""Preflight: everything a run needs, checked before the model loads.

Loading Stable Diffusion and the rendering code takes 15-30 s; a run that then stops on a corrupt
mesh, an unwritable run folder or an incomplete model folder has wasted that time and left a run
folder behind. `preflight` checks, in about two seconds on a CPU and without creating anything:

1. the run folder: creatable (no part of its path is a file, the nearest existing folder is
   writable) or, when it exists, a writable folder;
2. every file the config names, parsed: meshes (`base_mesh` where the mode uses it, `target_mesh`
   under guidance=target_mesh) with `render.mesh.load_mesh`, HDR maps (`envmap`, `relight`,
   display relight layers) decoded with `render.light.check_envmap`;
3. a local `sd_model` folder's parts (model_index.json, unet/ vae/ text_encoder/ tokenizer/
   scheduler/ with their config files and weights) with `model_files.check_model_folder`, without
   loading weights or importing torch or diffusers. A hub id is left to the loader (it needs the
   network);
4. tensorboard=on: the tensorboard package is installed (found, not imported).

Each failure is a `PreflightError`, a `config.ConfigError` of one line naming the key, the file and
the fix: train.py prints it as `error: ...` and exits 2, for a run and for `--check` alike.
"""
from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import model_files
from config import Config, ConfigError, check_files, named_files, resolve_path

MESH_KEYS = ("base_mesh", "target_mesh")
MESH_FIX = "fix or re-export the file, or point {key} at another mesh (OBJ, PLY, STL, GLB or OFF)"
HDR_FIX = "point {key} at a readable lat-long .hdr or .exr map"


class PreflightError(ConfigError):
    """Something a run needs is unusable; the one-line message names the key, the file and the fix."""


class RunFolderError(PreflightError):
    """The run folder (out_dir) cannot be created or written."""


class InputFileError(PreflightError):
    """A file the config names exists but cannot be read as what the key needs."""


class ModelFolderError(PreflightError):
    """The local sd_model folder lacks a part the diffusion model is loaded from."""


def preflight(cfg: Config, config_path: str | os.PathLike | None) -> None:
    """Check everything the run of `cfg` (read from `config_path`) needs before any model loads.

    Cheap checks come first: the named files exist (config.check_files, whose messages users know),
    the run folder can be written, tensorboard=on has its package, the model folder has its parts;
    then the files' contents, whose readers import torch (~1.5 s) and only when a file is named.
    Creates nothing: the one write probe (as root, see `_unwritable_reason`) removes its file.
    Raises PreflightError (or the ConfigError of check_files), one line each.
    """
    check_files(cfg)
    if _writes_run_folder():
        check_run_folder(cfg.run_dir(config_path))
    check_tensorboard(cfg.tensorboard)
    check_model_folder(cfg)
    check_file_contents(cfg)


# ------------------------------------------------------------------------------------------------
# 1. The run folder
# ------------------------------------------------------------------------------------------------
def _writes_run_folder() -> bool:
    """Only rank 0 writes the run folder (trainer.run): under torchrun the other processes need no
    write access to it, and may run on hosts that have none."""
    return os.environ.get("RANK", "0") in ("", "0")


def check_run_folder(run_dir: Path) -> None:
    """`run_dir` is a writable folder, or can be made one by mkdir -p. Raises RunFolderError."""
    if run_dir.is_dir():
        reason = _unwritable_reason(run_dir)
        if reason:
            raise _run_folder_error(run_dir, f"it exists but {reason}", f"make {run_dir} writable")
        return
    if os.path.lexists(run_dir):
        kind = "an existing file" if run_dir.is_file() else "an existing entry that is not a folder"
        raise _run_folder_error(run_dir, f"it is {kind}", "move that file away")
    ancestor = _nearest_existing(run_dir)
    if not ancestor.is_dir():
        raise _run_folder_error(run_dir, f"it cannot be created: {ancestor} is a file, not a folder",
                                "use a path whose parents are folders")
    reason = _unwritable_reason(ancestor)
    if reason:
        raise _run_folder_error(run_dir, f"it cannot be created in {ancestor}: {reason}",
                                f"make {ancestor} writable")


def _nearest_existing(path: Path) -> Path:
    """The closest of `path`'s parents that exists (a dangling link counts: mkdir fails on it)."""
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent
    return Path(path.anchor or ".")


def _unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be created in `folder` (None: they can).

    Permission bits (os.access) answer for ordinary users. Root bypasses them, so for root, whose
    writes fail only where the file system refuses them (/proc, /sys, a read-only or root-squashed
    mount), a file is created and removed: the only test that tells."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "it is on a read-only file system" if _read_only_mount(folder) else "this user may not write there"
    if _is_root():
        try:
            fd, probe = tempfile.mkstemp(prefix=".preflight-", dir=folder)
        except OSError as e:
            return f"creating a file there fails ({e.strerror or e})"
        os.close(fd)
        os.unlink(probe)
    return None


def _read_only_mount(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _is_root() -> bool:
    geteuid = getattr(os, "geteuid", None)  # absent on Windows, where there is no root bypass
    return geteuid is not None and geteuid() == 0


def _run_folder_error(run_dir: Path, problem: str, fix: str) -> RunFolderError:
    return RunFolderError(f"invalid value for 'out_dir': the run folder {run_dir} is unusable: {problem}; "
                          f"set out_dir to a writable folder path (a relative one goes under ./out/) or {fix}")


# ------------------------------------------------------------------------------------------------
# 2. The files the config names
# ------------------------------------------------------------------------------------------------
def check_file_contents(cfg: Config) -> None:
    """Parse every file config.named_files lists (they exist: check_files ran). Raises InputFileError."""
    for key, value, _ in named_files(cfg):
        path = resolve_path(value)
        if key in MESH_KEYS:
            check_mesh_file(key, path)
        else:
            check_hdr_file(key, path)


def check_mesh_file(key: str, path: Path) -> None:
    """`path` loads as a non-empty triangle mesh with finite vertices and in-range face indices."""
    from render.mesh import load_mesh, validate_mesh  # torch + trimesh (~2 s) only when a mesh is named

    try:
        validate_mesh(load_mesh(path), str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise InputFileError(f"cannot read '{key}' {path}: {_one_line(e)}; {MESH_FIX.format(key=key)}") from None


def check_hdr_file(key: str, path: Path) -> None:
    """`path` decodes as a float RGB lat-long environment map."""
    from render import light  # torch + OpenCV (~2 s) only when an HDR map is named

    try:
        light.check_envmap(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        fix = HDR_FIX.format(key=key) + (" (or leave envmap unset: the shipped studio sky)" if key == "envmap" else "")
        raise InputFileError(f"cannot read '{key}' {path}: {_one_line(e)}; {fix}") from None


# ------------------------------------------------------------------------------------------------
# 3. The model folder
# ------------------------------------------------------------------------------------------------
def check_model_folder(cfg: Config) -> None:
    """A local sd_model folder has every part the loader reads (model_files.check_model_folder, the
    same check model_files.resolve_sd_model makes), and so has a local prompt_debias_model when
    prompt debiasing is on. A hub id is left to the loader (network). Raises ModelFolderError."""
    if cfg.guidance != "stable_diffusion":
        return
    checks = []
    if model_files.is_local_model(cfg.sd_model):
        checks.append(lambda: model_files.check_model_folder(cfg.sd_model))
    if cfg.prompt_debias and model_files.is_local_masked_lm(cfg.prompt_debias_model):
        checks.append(lambda: model_files.check_masked_lm_folder(cfg.prompt_debias_model))
    for check in checks:
        try:
            check()
        except model_files.InvalidModelFolderError as e:
            raise ModelFolderError(_one_line(e)) from None


# ------------------------------------------------------------------------------------------------
# 4. Optional packages the config asks for
# ------------------------------------------------------------------------------------------------
def check_tensorboard(mode: str) -> None:
    """tensorboard=on without the package stops before any model loads. The package is looked up,
    not imported (tb_log imports it with torch; tensorboard=auto simply skips it when missing)."""
    if mode == "on" and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("tensorboard=on needs the tensorboard package, which is not installed: "
                          "pip install tensorboard, or set tensorboard=auto (or off)")


def _one_line(error: BaseException) -> str:
    """The error's text on one line (readers' messages, trimesh's or OpenCV's, may span several),
    without a final full stop, since the fix follows it."""
    return " ".join(str(error).split()).rstrip(".")
