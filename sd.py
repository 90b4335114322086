"""Stable Diffusion guidance: model loading, prompt embeddings and Score Distillation Sampling.

Depends on torch, diffusers and transformers; where the weights are and whether they are complete
is model_files.py's (torch-free, so that config checks stay fast).

SDS (docs/DESIGN.md, "Conventions and formulas"): for latents z, draw t ~ U{int(1000*lo) .. int(1000*hi)} and noise eps,
form z_t = sqrt(a_t) z + sqrt(1 - a_t) eps, predict eps_hat with classifier-free guidance
eps_hat = eps_uncond + s * (eps_text - eps_uncond), and inject grad = w(t) * (eps_hat - eps) as the
gradient of z (the UNet is never differentiated).

Against multi-face ("Janus") shapes, two options, both off by default:

- Perp-Neg (Armandpour et al. 2023): per camera the positive prompt embedding is interpolated by
  azimuth between the view prompts, and two view prompts enter as negatives through their
  components perpendicular to the positive direction (``perp_neg_views``, ``perp_neg_eps``). The
  UNet then runs on 4B rows [uncond, pos, neg1, neg2] instead of 2B.
- Prompt debiasing (Hong et al. 2023): a masked language model finds the words of the prompt that
  pull against a view ("smiling" for the back), and each view's prompt drops them
  (``debias_prompt``); computed once when the model loads.

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

import contextlib
import gc
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
import torch._functorch.config
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn
from torch._inductor.runtime.cache_dir_utils import default_cache_dir
from torch.utils._triton import has_triton
from transformers import AutoModelForMaskedLM, AutoTokenizer, CLIPTextModel, CLIPTokenizer

import progress
from model_files import (DEFAULT_MASKED_LM, DEFAULT_SD_MODEL, InvalidModelFolderError, ModelNotFoundError,
                         hub_cache_dir, hub_offline, missing_model_message, resolve_masked_lm, resolve_sd_model)
from run_status import RunInterrupted

MODES = ("geometry_modeling", "appearance_modeling")
STAGES = ("geometry_coarse", "geometry_fine", "appearance")
VIEW_NAMES = ("front", "side", "back", "side")  # view index 0..3, docs/DESIGN.md, "Conventions and formulas"
DEFAULT_NEGATIVE_TEXT = {
    "geometry_modeling": "low quality",
    "appearance_modeling": "shadow, oversaturated, low quality, unrealistic",
}
NUM_TRAIN_TIMESTEPS = 1000

# Perp-Neg's negative weights w = -(a exp(-b x) + c), one (a, b, c) per negative, in this order:
# front-side region (|azimuth| < 90): the front prompt at x = r, the side prompt at x = 1 - r;
# side-back region: the side prompt at x = r, the front prompt at x = r (r of perp_neg_views).
# The values threestudio uses with Stable Diffusion.
PERP_NEG_DECAY: tuple[tuple[float, float, float], ...] = (
    (4.0, 0.5, -2.426), (4.0, 0.5, -2.426), (1.0, 0.5, -0.606), (1.0, 0.5, 0.967))
PERP_NEG_EPS = 1e-6          # floor of <y, y> in the perpendicular component

# Prompt debiasing: the masked language model fills the [MASK] of this sentence; the view words
# are the three views the directional prompts name.
DEBIAS_TEMPLATE = "This image is depicting a {mask} view of {prompt}"
DEBIAS_VIEWS = ("front", "side", "back")
DEBIAS_THRESHOLD = 0.95
VIEW_TEXT_OF_INDEX = (0, 1, 2, 1)   # view index 0..3 -> its DEBIAS_VIEWS slot (both sides share one)

# diffusion_compile (CompiledCall). Inductor's default mode: Triton kernels that fuse the memory-bound
# chains (GroupNorm, SiLU, residual adds and their backward), cuDNN and cuBLAS for the convolutions and
# matmuls. Its max-autotune modes also benchmark Triton convolution and matmul templates: minutes more
# for the UNet, past what a stage's first step may spend, against kernels cuDNN already tunes.
# COMPILE_OPTIONS: inductor settings by call ({} = the default mode), which
# scripts/dev/compile_check.py --inductor[-vae|-unet] varies; COMPILE_BACKEND "aot_eager" (the same
# graph capture and autograd, no code generation) lets the CPU tests check the plumbing in seconds.
COMPILE_MODES = ("auto", "on", "off")
COMPILE_BACKEND = "inductor"
COMPILE_OPTIONS: dict[str, dict[str, Any]] = {"VAE encoder": {}, "UNet": {}}
COMPILE_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


# --------------------------------------------------------------------------- errors


class GuidanceOptionsError(ValueError):
    """An option of the guidance has the wrong type or value."""


class PromptDebiasError(GuidanceOptionsError):
    """The masked language model of prompt_debias_model cannot score the view words."""


class DiffusionCompileError(RuntimeError):
    """diffusion_compile=on and torch.compile could not compile a diffusion call."""


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
    # torch.compile the VAE encoder (forward and backward) and the UNet forward (CompiledCall);
    # "auto": on CUDA with Triton, else eager with the reason printed.
    diffusion_compile: str = "off"
    # Perp-Neg (module doc): the UNet runs on 4B rows; implies the view prompts.
    perp_neg: bool = False
    perp_neg_decay: tuple[tuple[float, float, float], ...] = PERP_NEG_DECAY
    # Prompt debiasing (module doc) with the masked language model of this folder or hub id.
    prompt_debias: bool = False
    prompt_debias_model: str = DEFAULT_MASKED_LM

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
        if self.diffusion_compile not in COMPILE_MODES:
            raise GuidanceOptionsError(
                f"diffusion_compile: expected 'auto', 'on' or 'off', got {self.diffusion_compile!r}")
        if self.image_resolution <= 0 or self.image_resolution % 8:
            raise GuidanceOptionsError(
                "image_resolution: expected a positive multiple of 8 (the VAE downsamples x8), "
                f"got {self.image_resolution!r}")
        self.perp_neg_decay = check_perp_neg_decay(self.perp_neg_decay)

    @property
    def negative_prompt(self) -> str:
        """``negative_text`` when given, else the per-mode default of docs/DESIGN.md, "Config"."""
        return self.negative_text or DEFAULT_NEGATIVE_TEXT[self.mode]

    @property
    def directional(self) -> bool:
        """Whether the view text (", front view", ...) is appended: add_directional_text, or
        Perp-Neg, whose positive and negative prompts are the view prompts."""
        return self.add_directional_text or self.perp_neg

    @property
    def view_dependent(self) -> bool:
        """Whether each camera's prompt depends on its view: directional text or debiased prompts."""
        return self.directional or self.prompt_debias

    def prompts_for(self, view_texts: Sequence[str] | None = None) -> list[str]:
        """The prompts to embed: one when no option makes them view dependent, else four, by
        view index 0..3 (front, side, back, side).

        ``view_texts``: the (front, side, back) texts, e.g. the debiased prompts; None: ``text``
        for every view. With ``directional`` each gets ", {view} view" appended."""
        if not self.view_dependent:
            return [self.text]
        texts = tuple(view_texts) if view_texts is not None else (self.text,) * len(DEBIAS_VIEWS)
        if len(texts) != len(DEBIAS_VIEWS):
            raise ValueError(f"view_texts: expected {len(DEBIAS_VIEWS)} texts {DEBIAS_VIEWS}, got {texts!r}")
        return [f"{texts[slot]}, {view} view" if self.directional else texts[slot]
                for view, slot in zip(VIEW_NAMES, VIEW_TEXT_OF_INDEX)]

    @property
    def prompts(self) -> list[str]:
        """One prompt, or the four view prompts (index = view index) with the view text."""
        return self.prompts_for(None)


def check_perp_neg_decay(decay: Sequence[Sequence[float]]) -> tuple[tuple[float, float, float], ...]:
    """Validate Perp-Neg's four (a, b, c) triples (PERP_NEG_DECAY's order); returns them as tuples."""
    try:
        triples = tuple(tuple(float(v) for v in abc) for abc in decay)
    except (TypeError, ValueError):
        triples = ()
    if len(triples) != 4 or any(len(abc) != 3 or not all(map(math.isfinite, abc)) for abc in triples):
        raise GuidanceOptionsError(f"perp_neg_decay: expected four [a, b, c] triples of finite numbers, "
                                   f"got {decay!r}")
    return triples


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
    text_emb: Tensor | None = None  # [2B, L, D] prompt embeddings (Stable Diffusion only);
                                    # [4B, L, D] uncond, pos, neg1, neg2 with Perp-Neg
    neg_weights: Tensor | None = None  # [B, 2] Perp-Neg weights of the two negatives (None: plain CFG)

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


# --------------------------------------------------------------------------- Perp-Neg


def perpendicular(x: Tensor, y: Tensor, eps: float = PERP_NEG_EPS) -> Tensor:
    """The component of x perpendicular to y, per sample: x - (<x, y> / max(<y, y>, eps)) y, with
    x, y [B, ...] and the inner products over all but the first dimension."""
    if x.shape != y.shape:
        raise ValueError(f"perpendicular: expected x and y of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    dims = tuple(range(1, x.dim()))
    coef = (x * y).sum(dims, keepdim=True) / (y * y).sum(dims, keepdim=True).clamp_min(eps)   # [B, 1, ...]
    return x - coef * y


@dataclass
class PerpNegViews:
    """Per camera: which views its positive prompt blends, by how much, and the negatives' weights."""
    front_side: Tensor   # [B] bool: |azimuth| < 90 degrees (front-side region), else side-back
    r: Tensor            # [B] float32 in [0, 1]: pos = r front + (1 - r) side, or r side + (1 - r) back
    weights: Tensor      # [B, 2] float32: weights of the negatives (front, side) or (side, front)


def perp_neg_views(azimuth_rad: Tensor, decay: Sequence[Sequence[float]] = PERP_NEG_DECAY) -> PerpNegViews:
    """Perp-Neg's interpolation and negative weights for azimuths [B] in radians (0 front, +-pi back).

    With d = |azimuth| in degrees (wrapped to [0, 180]): front-side region (d < 90): r = 1 - d/90,
    negatives front (w = -(a0 exp(-b0 r) + c0)) and side (w = -(a1 exp(-b1 (1 - r)) + c1));
    side-back region: r = 2 - d/90, negatives side (w = -(a2 exp(-b2 r) + c2)) and front
    (w = -(a3 exp(-b3 r) + c3)); (a_i, b_i, c_i) = decay[i]. Computed where the azimuths are
    (no host read)."""
    a = torch.as_tensor(azimuth_rad).float()
    deg = (torch.remainder(torch.rad2deg(a) + 180.0, 360.0) - 180.0).abs()      # [B] in [0, 180]
    front_side = deg < 90.0
    # clamp: 2 - 180.000005/90 in float32 would be a hair below 0.
    r = torch.where(front_side, 1.0 - deg / 90.0, 2.0 - deg / 90.0).clamp(0.0, 1.0)

    def weight(abc: Sequence[float], x: Tensor) -> Tensor:
        return -(abc[0] * torch.exp(-abc[1] * x) + abc[2])

    first = torch.where(front_side, weight(decay[0], r), weight(decay[2], r))
    second = torch.where(front_side, weight(decay[1], 1.0 - r), weight(decay[3], r))
    return PerpNegViews(front_side=front_side, r=r, weights=torch.stack([first, second], dim=1))


def perp_neg_eps(eps_uncond: Tensor, eps_pos: Tensor, eps_negs: Sequence[Tensor], weights: Tensor,
                 scale: float) -> Tensor:
    """eps = eps_u + s (e_pos + sum_i w_i perp(e_i, e_pos)), e_pos = eps_pos - eps_u,
    e_i = eps_negs[i] - eps_u; all [B, C, h, w], weights [B, K] with K = len(eps_negs)."""
    if weights.shape != (eps_uncond.shape[0], len(eps_negs)):
        raise ValueError(f"weights: expected shape ({eps_uncond.shape[0]}, {len(eps_negs)}), "
                         f"got {tuple(weights.shape)}")
    e_pos = eps_pos - eps_uncond
    guided = e_pos
    for i, eps_neg in enumerate(eps_negs):
        w = weights[:, i].view(-1, *([1] * (e_pos.dim() - 1)))
        guided = guided + w * perpendicular(eps_neg - eps_uncond, e_pos)
    return eps_uncond + scale * guided


# --------------------------------------------------------------------------- prompt debiasing


@dataclass
class DebiasedPrompts:
    """What prompt debiasing found for one prompt (views in DEBIAS_VIEWS order)."""
    words: tuple[str, ...]                # the prompt's words (split at white space)
    p_full: Tensor                        # [3] P(view | prompt)
    p_without: Tensor                     # [W, 3] P(view | prompt without word w)
    dropped: Tensor                       # [W, 3] bool: word w is left out of that view's prompt
    texts: tuple[str, ...]                # the (front, side, back) prompts


def view_word_ids(tokenizer) -> list[int]:
    """The token ids of DEBIAS_VIEWS; each view word must be one token of the vocabulary."""
    ids = []
    for word in DEBIAS_VIEWS:
        pieces = tokenizer.tokenize(word)
        if len(pieces) != 1 or tokenizer.convert_tokens_to_ids(pieces[0]) == tokenizer.unk_token_id:
            raise PromptDebiasError(
                f"prompt_debias_model: expected the view word {word!r} to be one token of the tokenizer's "
                f"vocabulary, got {pieces!r}; use a BERT-style masked language model such as {DEFAULT_MASKED_LM!r}")
        ids.append(tokenizer.convert_tokens_to_ids(pieces[0]))
    return ids


@torch.no_grad()
def view_probabilities(prompts: Sequence[str], tokenizer, model: nn.Module) -> Tensor:
    """[N, 3] P(view | prompt) for each prompt: the masked language model's probabilities of the
    view words at the [MASK] of DEBIAS_TEMPLATE, normalized over the three view words (a softmax
    of their logits). One forward pass over the padded batch."""
    if tokenizer.mask_token is None:
        raise PromptDebiasError("prompt_debias_model: expected a masked language model tokenizer with a mask "
                                f"token, got {type(tokenizer).__name__} without one")
    sentences = [DEBIAS_TEMPLATE.format(mask=tokenizer.mask_token, prompt=p) for p in prompts]
    enc = tokenizer(sentences, padding=True, return_tensors="pt")
    param = next(model.parameters())
    enc = {k: v.to(param.device) for k, v in enc.items()}
    is_mask = enc["input_ids"] == tokenizer.mask_token_id                     # [N, L]
    if not bool((is_mask.sum(dim=1) == 1).all()):
        raise PromptDebiasError(f"prompt: expected one {tokenizer.mask_token} in each debiasing sentence, got "
                                f"{is_mask.sum(dim=1).tolist()} in {sentences!r}; remove it from the prompt")
    logits = model(**enc).logits                                              # [N, L, V]
    at_mask = logits[is_mask]                                                 # [N, V]
    return torch.softmax(at_mask[:, view_word_ids(tokenizer)].float(), dim=-1).cpu()


def debias_prompt(prompt: str, tokenizer, model: nn.Module, threshold: float = DEBIAS_THRESHOLD) -> DebiasedPrompts:
    """Prompt debiasing (Hong et al. 2023, as threestudio implements it): with p(v) = P(v | prompt)
    and q_w(v) = P(v | prompt without word w) (view_probabilities), word w is dropped from view
    v's prompt when p(v) / (0.5 q_w(v) + 0.5 p(v)) < threshold (0.95), i.e. when removing w raises
    P(v) by more than a factor 2/threshold - 1 (1.105)."""
    words = tuple(prompt.split())
    variants = [" ".join(words[:i] + words[i + 1:]) for i in range(len(words))]
    probs = view_probabilities([" ".join(words), *variants], tokenizer, model)    # [1 + W, 3]
    p_full, p_without = probs[0], probs[1:]
    dropped = p_full / (0.5 * p_without + 0.5 * p_full) < threshold             # [W, 3]
    texts = tuple(" ".join(w for i, w in enumerate(words) if not bool(dropped[i, v]))
                  for v in range(len(DEBIAS_VIEWS)))
    return DebiasedPrompts(words=words, p_full=p_full, p_without=p_without, dropped=dropped, texts=texts)


def load_masked_lm(source: str, is_local: bool) -> tuple[object, nn.Module]:
    """(tokenizer, model) of prompt_debias_model, on the CPU in eval mode (a few sentences, once),
    from ``model_files.resolve_masked_lm``'s (source, is_local)."""
    kwargs = {} if is_local else {"cache_dir": hub_cache_dir(), "local_files_only": hub_offline()}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForMaskedLM.from_pretrained(source, **kwargs)
    except OSError as exc:
        error = InvalidModelFolderError if is_local else ModelNotFoundError
        raise error(f"prompt_debias_model: cannot load {source!r} as a masked language model "
                    f"({type(exc).__name__}: {' '.join(str(exc).split())}); point it at a BERT-style masked "
                    f"language model such as {DEFAULT_MASKED_LM!r}, or set prompt_debias false") from exc
    return tokenizer, _freeze(model)


def _load_component(cls, source: str, is_local: bool, subfolder: str, **kwargs):
    """``cls.from_pretrained(source, subfolder=...)`` with errors turned into ours."""
    if not is_local:
        kwargs.update(cache_dir=hub_cache_dir(), local_files_only=hub_offline())
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kwargs)
    except OSError as exc:
        if is_local:
            raise InvalidModelFolderError(
                f"sd_model: cannot load {subfolder}/ of {source!r} with {cls.__name__}: "
                f"{exc}") from exc
        reason = f"its {subfolder}/ could not be loaded ({type(exc).__name__}: {exc})"
        raise ModelNotFoundError(missing_model_message(source, hub_cache_dir(), reason)) from exc


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

    Buffers: ``text_embeds`` [V, L, D] (V = 4 view prompts, by view index, when the prompt is view
    dependent: directional text, Perp-Neg or debiasing; else 1), ``uncond_embeds`` [1, L, D]
    (negative prompt), ``alphas_cumprod`` [N] float32. ``debiased``: what prompt debiasing found
    (None when it is off).
    """

    def __init__(self, opts: GuidanceOptions, device: torch.device | str = "cpu") -> None:
        super().__init__()
        self.opts = opts
        self.device = torch.device(device)
        # fp16 halves memory and uses tensor cores on GPU; CPUs have no fast fp16 path.
        # Read this, never unet.dtype / vae.dtype: diffusers' ModelMixin.dtype walks every submodule
        # looking for casting hooks (1-2 ms of host time per read on SD 2.1, the GPU idle meanwhile).
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        # Before reading any weights: a missing model fails fast, with the key and the fix.
        source, is_local = resolve_sd_model(opts.sd_model)
        masked_lm = resolve_masked_lm(opts.prompt_debias_model) if opts.prompt_debias else None
        self.debiased: DebiasedPrompts | None = None
        if masked_lm is not None:
            with progress.timed(f"debiasing the prompt with {opts.prompt_debias_model}"):
                self.debiased = self._debias(*masked_lm)
        # Reading (on first use, downloading) ~5 GB of weights: seconds to minutes.
        with progress.timed(f"loading the diffusion model {opts.sd_model}"):
            self._load(source, is_local)

    def _debias(self, source: str, is_local: bool) -> DebiasedPrompts:
        tokenizer, model = load_masked_lm(source, is_local)
        found = debias_prompt(self.opts.text, tokenizer, model)
        if progress.OPTIONS.enabled:
            views = ", ".join(f"{view} {text!r}" for view, text in zip(DEBIAS_VIEWS, found.texts))
            print(f"debiased prompts: {views}", file=sys.stderr, flush=True)
        return found

    def _load(self, source: str, is_local: bool) -> None:
        """The prompt embeddings, VAE, UNet and noise schedule from the model folder or hub id."""
        opts = self.opts
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
        # encoder's forward+backward +29 ms at batch 4, the UNet no faster. Compiled, inductor picks
        # the layout of each graph (layout_optimization): channels-last convolutions where its
        # heuristic expects a gain; it keeps the VAE's training graph NCHW (the encoder's last
        # convolution narrows 512 channels to 8), which compile_check.py --inductor-vae
        # force_layout_optimization=1 compares.
        self._make_runners()

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

    def _make_runners(self) -> None:
        """``vae_runner`` and ``unet_runner``, the two diffusion calls, as diffusion_compile and
        unet_cuda_graph ask.

        A compiled UNet is captured in the UNet's CUDA graph like the eager one (CudaGraphUNet around
        CompiledCall), instead of compile's own graphs (mode "reduce-overhead"): one graph mechanism and
        one memory pool, the static buffers and Perp-Neg's second shape handled as before, and the
        compiled kernels replay in one launch either way; cudagraph trees would add a second pool and
        their own input copies."""
        mode = self.opts.diffusion_compile
        vae: Callable[[Tensor], Tensor] = self.eager_vae_moments
        unet: Callable[[Tensor, Tensor, Tensor], Tensor] = self.eager_unet
        skip = compile_skip_reason(self.device) if mode == "auto" else None
        if skip is not None:
            progress.note(f"diffusion_compile=auto: the diffusion model runs eagerly on {self.device}: {skip} "
                          "(diffusion_compile=on compiles it anyway)")
        elif mode != "off":
            use_compile_cache()
            vae = CompiledCall("VAE encoder", self.eager_vae_moments, strict=mode == "on")
            unet = CompiledCall("UNet", self.eager_unet, strict=mode == "on")
        self.vae_runner = vae
        self.unet_runner = self._make_unet_runner(self.opts.unet_cuda_graph, unet)

    def _make_unet_runner(self, mode: str, forward: Callable[[Tensor, Tensor, Tensor], Tensor]
                          ) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        if mode == "on" and self.device.type != "cuda":
            raise GuidanceOptionsError(f"unet_cuda_graph: 'on' needs a CUDA device, got {self.device}; "
                                       "use 'auto' or 'off'")
        if mode == "off" or self.device.type != "cuda":
            return forward
        return CudaGraphUNet(forward)

    def eager_unet(self, sample: Tensor, t: Tensor, text_emb: Tensor) -> Tensor:
        """The plain diffusers UNet call: eps (or v) [N, 4, h, w] for sample [N, 4, h, w], t [N]."""
        return self.unet(sample, t, encoder_hidden_states=text_emb).sample

    def eager_vae_moments(self, x: Tensor) -> Tensor:
        """The plain diffusers VAE encoder call: the posterior's mean and log-variance [B, 8, h, w]
        for images x [B, 3, R, R] in [-1, 1]."""
        return self.vae.encode(x).latent_dist.parameters

    @contextlib.contextmanager
    def eager_calls(self) -> Iterator[None]:
        """Inside: the plain diffusers calls, neither compiled nor graphed (the baseline speed and
        the parity checks compare against)."""
        saved = self.vae_runner, self.unet_runner
        self.vae_runner, self.unet_runner = self.eager_vae_moments, self.eager_unet
        try:
            yield
        finally:
            self.vae_runner, self.unet_runner = saved

    @property
    def compiled_calls(self) -> list[CompiledCall]:
        """The diffusion calls that diffusion_compile compiles (none when it is off or auto skips it)."""
        unet = self.unet_runner.forward if isinstance(self.unet_runner, CudaGraphUNet) else self.unet_runner
        return [c for c in (self.vae_runner, unet) if isinstance(c, CompiledCall)]

    def compile_seconds(self) -> dict[str, float]:
        """Seconds each compile took, by call and input, e.g. "VAE encoder [4, 3, 512, 512] float16
        (grad) forward and backward" (the VAE encoder's first, then the UNet's)."""
        return {f"{c.name} {what}": seconds for c in self.compiled_calls for what, seconds in c.seconds.items()}

    def _embed_prompts(self, source: str, is_local: bool) -> tuple[Tensor, Tensor]:
        tokenizer = _load_component(CLIPTokenizer, source, is_local, "tokenizer")
        text_encoder = _freeze(_load_component(CLIPTextModel, source, is_local, "text_encoder"))
        text_encoder.to(self.device, self.dtype)
        view_texts = self.debiased.texts if self.debiased is not None else None
        text_embeds = encode_prompts(tokenizer, text_encoder, self.opts.prompts_for(view_texts))  # [V,L,D]
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
        if self.opts.view_dependent:
            if view_index is None:
                raise ValueError("view_index: expected [B] view indices 0..3 because the prompt depends on "
                                 "the view (add_directional_text, perp_neg or prompt_debias is on), got None")
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

    def perp_neg_embeddings(self, azimuth: Tensor | Sequence[float] | None, batch: int) -> tuple[Tensor, Tensor]:
        """Perp-Neg's prompts for cameras at ``azimuth`` [B] (radians): ([4B, L, D] rows uncond,
        pos, neg1, neg2; [B, 2] negative weights), from the view prompts' embeddings F, S, K
        (front, side, back): pos = r F + (1 - r) S with negatives F, S in the front-side region,
        pos = r S + (1 - r) K with negatives S, F in the side-back region (perp_neg_views)."""
        if azimuth is None:
            raise ValueError("azimuth: expected [B] camera azimuths in radians because perp_neg is on, got None")
        az = torch.as_tensor(azimuth, dtype=torch.float32, device=self.text_embeds.device)
        if az.shape != (batch,):
            raise ValueError(f"azimuth: expected shape ({batch},), got {tuple(az.shape)}")
        views = perp_neg_views(az, self.opts.perp_neg_decay)
        front, side, back = (self.text_embeds[i].float() for i in range(3))   # [L, D] each (view index 0, 1, 2)
        r = views.r.view(-1, 1, 1)                                             # [B, 1, 1]
        fs = views.front_side.view(-1, 1, 1)
        pos = torch.where(fs, r * front + (1.0 - r) * side, r * side + (1.0 - r) * back)   # [B, L, D]
        neg1 = torch.where(fs, front, side)                                    # [B, L, D]
        neg2 = torch.where(fs, side, front)
        uncond = self.uncond_embeds.expand(batch, -1, -1)                      # [B, L, D]
        rows = torch.cat([uncond.float(), pos, neg1, neg2]).to(self.text_embeds.dtype)   # [4B, L, D]
        return rows, views.weights

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
        # The posterior is sampled outside the compiled call: the same generator draw either way.
        posterior = DiagonalGaussianDistribution(self.vae_runner(x))  # moments [B, 8, h, w]
        return posterior.sample(generator=generator) * self.scaling_factor

    @torch.no_grad()
    def predict_eps(self, z_t: Tensor, t: Tensor, text_emb: Tensor, neg_weights: Tensor | None = None) -> Tensor:
        """Guided noise estimate eps_hat [B, 4, h, w] float32 for z_t [B, 4, h, w], t [B].

        ``text_emb`` [2B, L, D] as from ``text_embeddings`` (negative rows first): classifier-free
        guidance, one UNet call on the 2B batch. With ``neg_weights`` [B, 2], ``text_emb`` is
        [4B, L, D] from ``perp_neg_embeddings`` and the one UNet call runs on 4B rows, combined by
        ``perp_neg_eps``. A v-prediction model's output is converted to epsilon.
        """
        batch = z_t.shape[0]
        branches = 2 if neg_weights is None else 2 + neg_weights.shape[1]
        if text_emb.shape[0] != branches * batch:
            what = "negative + prompt" if neg_weights is None else "negative + prompt + 2 negative views"
            raise ValueError(f"text_emb: expected {branches * batch} rows ({what} for "
                             f"B={batch}), got {text_emb.shape[0]}")
        model_in = torch.cat([z_t] * branches).to(self.dtype)         # [2B or 4B, 4, h, w]
        out = self.unet_runner(model_in, torch.cat([t] * branches), text_emb.to(self.dtype)).float()
        if neg_weights is None:
            out_uncond, out_text = out.chunk(2)
            pred = out_uncond + self.opts.guidance_weight * (out_text - out_uncond)
        else:
            out_uncond, out_pos, *out_negs = out.chunk(branches)
            pred = perp_neg_eps(out_uncond, out_pos, out_negs, neg_weights.float(), self.opts.guidance_weight)
        if self.prediction_type == "v_prediction":
            # CFG weights sum to 1, so converting after guidance equals converting each branch.
            # Perp-Neg too: the conversion scales every difference by sqrt(a), and the
            # perpendicular component scales with it (up to PERP_NEG_EPS).
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
             generator: torch.Generator | None = None,
             azimuth: Tensor | Sequence[float] | None = None) -> SdsDraw:
        """The render-independent part of ``sds`` (t, noise, weights, prompt embeddings) for
        latents of `latent_shape` [B, 4, h, w] (``latent_shape(B)`` for rendered inputs).
        ``azimuth`` [B] radians: the cameras' azimuths, which Perp-Neg needs."""
        o = self.opts
        d = draw_sds(self.alphas_cumprod, latent_shape, stage, it, o.coarse_iter, o.early_time_step_range,
                     o.late_time_step_range, o.sds_weight_strategy, generator, self.alphas_cumprod.device)
        if o.perp_neg:
            d.text_emb, d.neg_weights = self.perp_neg_embeddings(azimuth, latent_shape[0])
        else:
            d.text_emb = self.text_embeddings(view_index, latent_shape[0])
        return d

    def sds(self, inputs: Tensor, stage: str, it: int,
            view_index: Tensor | Sequence[int] | None = None,
            generator: torch.Generator | None = None, draw: SdsDraw | None = None,
            azimuth: Tensor | Sequence[float] | None = None) -> SDSResult:
        """One SDS evaluation; see the module doc for the result and the non-finite policy.

        inputs: geometry_coarse: latents [B, 4, h, w]; geometry_fine: the normal image
        (n + 1) / 2 [B, 3, H, W] in [0, 1]; appearance: the sRGB image [B, 3, H, W] in [0, 1].
        Random draws from ``generator``, in this order: VAE posterior sample (VAE stages only),
        t [B], noise [B, 4, h, w]. With ``draw`` (from ``draw``, made before the render; the
        training step does this), t and noise come from it and the posterior sample is drawn here.
        ``azimuth`` [B] radians: needed with Perp-Neg when no ``draw`` is given.
        """
        latents = self.stage_latents(inputs, stage, generator)        # [B, 4, h, w]
        if draw is None:
            draw = self.draw(latents.shape, stage, it, view_index, generator, azimuth)
        eps_hat = self.predict_eps(draw.add_noise(latents.detach()), draw.t, draw.text_emb, draw.neg_weights)
        return sds_from_eps(latents, draw.noise, draw.t, eps_hat, draw.w)


class CudaGraphUNet:
    """A frozen UNet's forward replayed from CUDA graphs, one per input shape/dtype.

    At SD batch sizes the eager UNet is bound by host-side kernel launches (~1000 per call: on an
    H200 the GPU sat idle ~40% of a coarse step); a graph replay issues them
    in one call. Inputs are copied into the graph's static buffers. The returned tensor is the
    graph's static output: valid until the next call, so callers consume it at once (predict_eps
    converts it to fp32 right away). Call under ``torch.no_grad()``. Perp-Neg's 4B-row batch is
    one more shape, so it gets its own graph, captured on its first call.
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
            compiled = " (or diffusion_compile=off to capture the eager UNet)" if isinstance(
                self.forward, CompiledCall) else ""
            raise RuntimeError(f"capturing the UNet in a CUDA graph failed ({e}); set unet_cuda_graph=off "
                               f"to run it without a graph{compiled}") from e
        return static_in, static_out, graph


# --------------------------------------------------------------------------- compiled diffusion calls


def compile_cache_dir() -> Path:
    """Where inductor keeps compiled kernels between runs: $TORCHINDUCTOR_CACHE_DIR when set, else
    $XDG_CACHE_HOME/fantasia3d/inductor (~/.cache/fantasia3d/inductor). Per user and stable: torch's
    own default, a folder in /tmp, is gone after a reboot."""
    chosen = os.environ.get(COMPILE_CACHE_ENV)
    # Importing inductor's config (diffusers does) writes torch's default into the variable: any
    # other value is the user's.
    if chosen and os.path.abspath(chosen) != os.path.abspath(default_cache_dir()):
        return Path(chosen).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fantasia3d" / "inductor"


def use_compile_cache() -> Path:
    """Point inductor at compile_cache_dir() with its FX graph and AOTAutograd caches on: a later
    run of the same stage loads its kernels instead of generating them again. Returns the folder."""
    path = compile_cache_dir()
    os.environ[COMPILE_CACHE_ENV] = str(path)        # inductor reads it at every compile
    # torch._inductor loads on first attribute access: runs that never compile skip its import.
    torch._inductor.config.fx_graph_cache = True
    torch._functorch.config.enable_autograd_cache = True
    return path


def compile_skip_reason(device: torch.device) -> str | None:
    """Why diffusion_compile=auto leaves the diffusion calls eager on ``device``; None: compile them."""
    if device.type != "cuda":
        return ("compiling pays off on CUDA, where it fuses the memory-bound GroupNorm and SiLU chains; "
                f"on {device.type} it takes minutes for little gain")
    if not has_triton():
        return "Triton, which inductor writes its GPU kernels in, is not installed or cannot run on this GPU"
    return None


def _stop_in(error: BaseException) -> BaseException | None:
    """The stop request or out-of-memory error in ``error``'s chain, if any: dynamo wraps what its
    tracing raises, but a second Ctrl-C or an exhausted GPU is no compile failure to fall back from."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, (RunInterrupted, KeyboardInterrupt, SystemExit, torch.cuda.OutOfMemoryError)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


class CompiledCall:
    """One diffusion call (``eager``, a function of tensors returning one tensor) compiled by
    torch.compile for the fixed shapes of a stage (dynamic=False, one graph: fullgraph=True).

    Inputs are made contiguous, then the first call of each signature (shapes, dtypes, which need
    gradients, whether gradients are recorded) compiles, with a line before and the seconds after.
    When an input needs a gradient it also runs a backward there, on a detached copy: AOTAutograd
    compiles the backward graph lazily, inside the caller's backward otherwise, where its time would
    go unreported and its failure could not fall back. ``strict`` (diffusion_compile=on): a failure
    raises DiffusionCompileError naming the key; otherwise (auto) the reason is printed and
    ``eager`` runs from then on. ``seconds``: compile time by signature.
    """

    def __init__(self, name: str, eager: Callable[..., Tensor], strict: bool) -> None:
        self.name, self.eager, self.strict = name, eager, strict
        self.seconds: dict[str, float] = {}  # "<signature> forward[ and backward]" -> compile seconds
        self.failure: str | None = None       # why the call runs eagerly after all (auto only)
        self._signatures: set[str] = set()
        self.compiled: Callable[..., Tensor] = eager
        # Only inductor takes options; none is its default mode.
        options = (COMPILE_OPTIONS.get(name) or None) if COMPILE_BACKEND == "inductor" else None
        try:
            if torch._dynamo.config.disable:
                raise RuntimeError("torch.compile is disabled in this process (TORCH_COMPILE_DISABLE=1 or "
                                   "torch._dynamo.config.disable)")
            self.compiled = torch.compile(eager, backend=COMPILE_BACKEND, fullgraph=True, dynamic=False,
                                          options=options)
        except Exception as e:   # e.g. a Python version torch.compile does not support yet
            self._fail(e)

    def __call__(self, *args: Tensor) -> Tensor:
        if self.failure is None:
            # One memory layout for one graph: the UNet's latents come channels-last from the VAE on
            # some devices and contiguous from the coarse render, which would compile the UNet twice.
            dense = tuple(a.contiguous() for a in args)
            key = _signature(dense)
            if key not in self._signatures:
                self._compile(key, dense)
            if self.failure is None:
                return self.compiled(*dense)
        return self.eager(*args)

    def _compile(self, key: str, args: tuple[Tensor, ...]) -> None:
        warm = [a.detach().requires_grad_(a.requires_grad) for a in args]
        wants_grad = [w for w in warm if w.requires_grad] if torch.is_grad_enabled() else []
        what = f"{key} forward" + (" and backward" if wants_grad else "")
        progress.note(f"compiling the {self.name} for {what} (first use; cached in {compile_cache_dir()})...")
        start = time.perf_counter()
        try:
            out = self.compiled(*warm)
            if wants_grad:
                torch.autograd.grad(out, wants_grad, torch.ones_like(out))
            if out.device.type == "cuda":
                torch.cuda.synchronize(out.device)
        except Exception as e:   # dynamo, AOTAutograd, inductor and the C++/Triton compilers raise their own
            self._fail(e)
            return
        self._signatures.add(key)
        self.seconds[what] = round(time.perf_counter() - start, 3)
        progress.note(f"compiled the {self.name} for {what}: {self.seconds[what]:.1f} s")

    def _fail(self, error: Exception) -> None:
        stop = _stop_in(error)
        if stop is not None:
            raise stop
        reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
        if self.strict:
            raise DiffusionCompileError(f"diffusion_compile: compiling the {self.name} failed ({reason}); set "
                                        "diffusion_compile=off to run it eagerly, or auto to fall back by itself"
                                        ) from error
        self.failure = reason
        progress.note(f"diffusion_compile=auto: compiling the {self.name} failed ({reason}); it runs eagerly",
                      every_rank=True)


def _signature(args: Sequence[Tensor]) -> str:
    """What dynamo specializes a compiled call on, for contiguous inputs: their shapes, dtypes and
    gradients, and whether gradients are recorded. Readable: it names the compile in the log."""
    parts = [f"{list(a.shape)} {str(a.dtype).removeprefix('torch.')}" + (" (grad)" if a.requires_grad else "")
             for a in args]
    return ", ".join(parts) + ("" if torch.is_grad_enabled() else " (no grad)")


def _randn(shape: torch.Size, generator: torch.Generator | None,
           device: torch.device) -> Tensor:
    """float32 normal noise drawn on the generator's device, then moved (CPU generator + CUDA)."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device).to(device)


def _check_images(imgs: Tensor, name: str) -> None:
    if imgs.dim() != 4 or imgs.shape[1] != 3:
        raise ValueError(f"{name}: expected images [B, 3, H, W] in [0, 1], got shape "
                         f"{tuple(imgs.shape)}")
