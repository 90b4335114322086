"""The Stable Diffusion guidance (the model and its SDS live in sd.py), as the config selects it:
guidance=stable_diffusion."""
from __future__ import annotations

import torch

from config import Config
from dataset.cameras import CameraBatch
from guidance.base import GuidanceEnv, StageInput, image_resolution, input_for
from guidance.registry import register
from sd import GuidanceOptions, SDSResult, SdsDraw, StableDiffusionGuidance


def guidance_options(cfg: Config) -> GuidanceOptions:
    """The model's options from the run's config."""
    return GuidanceOptions(sd_model=cfg.sd_model, mode=cfg.mode, text=cfg.text, negative_text=cfg.negative_text,
                           add_directional_text=cfg.add_directional_text, guidance_weight=float(cfg.guidance_weight),
                           sds_weight_strategy=cfg.sds_weight_strategy,
                           early_time_step_range=tuple(cfg.early_time_step_range),
                           late_time_step_range=tuple(cfg.late_time_step_range), coarse_iter=cfg.coarse_iter,
                           image_resolution=image_resolution(cfg), unet_cuda_graph=cfg.unet_cuda_graph,
                           diffusion_compile=cfg.diffusion_compile,
                           perp_neg=cfg.perp_neg, perp_neg_decay=tuple(map(tuple, cfg.perp_neg_decay)),
                           prompt_debias=cfg.prompt_debias, prompt_debias_model=cfg.prompt_debias_model)


class StableDiffusion:
    """The prompt's guidance: classifier-free guided SDS from Stable Diffusion (sd.py)."""

    def __init__(self, env: GuidanceEnv) -> None:
        self.cfg = env.cfg
        self.model = StableDiffusionGuidance(guidance_options(env.cfg), env.device)

    def stage_input(self, stage: str) -> StageInput:
        return input_for(stage, self.cfg)

    def draw(self, stage: str, it: int, cams: CameraBatch, generator: torch.Generator) -> SdsDraw:
        return self.model.draw(self.model.latent_shape(len(cams)), stage, it, cams.view_index, generator,
                               cams.azimuth)

    def sds(self, x: torch.Tensor, stage: str, it: int, cams: CameraBatch, generator: torch.Generator,
            draw: SdsDraw | None = None) -> SDSResult:
        return self.model.sds(x, stage, it, cams.view_index, generator, draw, cams.azimuth)


@register("stable_diffusion")
def build(env: GuidanceEnv) -> StableDiffusion:
    return StableDiffusion(env)
