"""Target-mesh guidance: the exact denoiser of a known target (docs/DESIGN.md, "Measuring quality without weights").

For the current cameras the target is rendered the same way as the model (coarse geometry:
normal + mask latents; fine geometry and appearance: the image, "encoded" by 8x8 average pooling
instead of a VAE) to get z*, and eps_hat = (z_t - sqrt(a) z*) / sqrt(1 - a) is the noise a perfect
denoiser of that single image would predict. Everything else - timesteps, weights, gradient
injection, non-finite handling - is the Stable Diffusion guidance's own code, so optimization with
this guidance measures the whole SDS pipeline on machines without model weights.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from config import Config
from dataset.cameras import CameraBatch
from guidance.base import IMAGE, GuidanceEnv, StageInput, TargetRenderer, input_for
from guidance.registry import register
from sd import SDSResult, SdsDraw, draw_sds, sds_from_eps

POOL = 8  # stands in for the VAE's x8 downsampling


def scaled_linear_alphas_cumprod(num_steps: int = 1000, beta_start: float = 0.00085,
                                 beta_end: float = 0.012) -> torch.Tensor:
    """The SD 2.x DDPM schedule (scaled_linear betas), so t means the same as with the real model."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, num_steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


@dataclass
class TargetGuidanceOptions:
    coarse_iter: int
    early_time_step_range: tuple[float, float]
    late_time_step_range: tuple[float, float]
    sds_weight_strategy: int = 0

    @classmethod
    def from_config(cls, cfg: Config) -> "TargetGuidanceOptions":
        return cls(cfg.coarse_iter, tuple(cfg.early_time_step_range), tuple(cfg.late_time_step_range),
                   cfg.sds_weight_strategy)


def pooled_latents(images_bx3xhxw: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] -> [-1, 1] -> 8x8 average pooled 'latents' [B, 3, H/8, W/8]."""
    if images_bx3xhxw.dim() != 4 or images_bx3xhxw.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W], got {tuple(images_bx3xhxw.shape)}")
    return F.avg_pool2d(images_bx3xhxw * 2.0 - 1.0, POOL)


class TargetMeshGuidance:
    """guidance=target_mesh: renders of cfg.target_mesh (by the phase's renderer) are the one
    image a perfect denoiser knows."""

    def __init__(self, render_target: TargetRenderer, opts: TargetGuidanceOptions, device: torch.device,
                 inputs: Callable[[str], StageInput]) -> None:
        self.render_target = render_target
        self.opts = opts
        self.inputs = inputs
        self.alphas_cumprod = scaled_linear_alphas_cumprod().to(device)

    def stage_input(self, stage: str) -> StageInput:
        return self.inputs(stage)

    def _latents(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        return pooled_latents(x) if self.stage_input(stage).kind == IMAGE else x

    def latent_shape(self, batch: int, stage: str, resolution: tuple[int, int]) -> tuple[int, int, int, int]:
        """[B, 4, s, s] normal + mask latents, or [B, 3, H/8, W/8] pooled images."""
        spec = self.stage_input(stage)
        if spec.kind == IMAGE:
            return (batch, 3, resolution[0] // POOL, resolution[1] // POOL)
        return (batch, 4, spec.size, spec.size)

    def draw(self, stage: str, it: int, cams: CameraBatch, generator: torch.Generator | None = None) -> SdsDraw:
        o = self.opts
        shape = self.latent_shape(len(cams), stage, cams.resolution)
        return draw_sds(self.alphas_cumprod, shape, stage, it, o.coarse_iter, o.early_time_step_range,
                        o.late_time_step_range, o.sds_weight_strategy, generator, self.alphas_cumprod.device)

    def sds(self, inputs: torch.Tensor, stage: str, it: int, cams: CameraBatch,
            generator: torch.Generator | None = None, draw: SdsDraw | None = None) -> SDSResult:
        """Random draws from ``generator``: t, then noise (or both from ``draw``)."""
        latents = self._latents(inputs, stage)                               # [B, C, h, w]
        with torch.no_grad():
            target = self._latents(self.render_target(cams, stage), stage)
        if target.shape != latents.shape:
            raise ValueError(f"target render: expected shape {tuple(latents.shape)}, got {tuple(target.shape)}")
        if draw is None:
            draw = self.draw(stage, it, cams, generator)
        z_t = draw.add_noise(latents.detach())
        eps_hat = (z_t - draw.sqrt_a * target.float()) / draw.sqrt_1ma     # exact denoiser of z*
        return sds_from_eps(latents, draw.noise, draw.t, eps_hat, draw.w)


@register("target_mesh")
def build(env: GuidanceEnv) -> TargetMeshGuidance:
    cfg = env.cfg
    return TargetMeshGuidance(env.target_renderer(), TargetGuidanceOptions.from_config(cfg), env.device,
                              lambda stage: input_for(stage, cfg))
