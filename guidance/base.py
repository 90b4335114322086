"""The guidance interface: what a guidance consumes in each stage and what it returns.

A phase asks its guidance, per stage, for a `StageInput`; renders exactly that; draws the step's
random time step and noise (`draw`, before the render, so the draw never waits for the device);
and calls `sds`, whose `sd.SDSResult` carries the surrogate loss (its gradient is the SDS
gradient) and the device-side statistics the trainer logs. docs/DESIGN.md, "Extension points".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from config import Config
from dataset.cameras import CameraBatch
from sd import SDSResult, SdsDraw

NORMAL_MASK = "normal_mask"   # [B, 4, s, s]: camera-space normals (xyz) and coverage, resized to s x s
IMAGE = "image"               # [B, 3, H, W] in [0, 1] at the render's resolution; the guidance encodes it

# Renders the config's target_mesh for a camera batch and stage in the stage's input format,
# without gradients (the target-mesh guidance, and any guidance that compares with a known mesh).
TargetRenderer = Callable[[CameraBatch, str], torch.Tensor]


class GuidanceInputError(ValueError):
    """A guidance asked a phase for an input that phase cannot render."""


@dataclass(frozen=True)
class StageInput:
    """What a guidance consumes in one stage.

    kind NORMAL_MASK (geometry only): the published coarse stage's input, the normal + mask image
    resized to `size` x `size` and used directly as the 4-channel latent. kind IMAGE: an image the
    guidance encodes itself (geometry: normals shown as colours; appearance: the shaded colour)."""
    kind: str
    size: int | None = None    # NORMAL_MASK: the latent's side; IMAGE: None (the render's resolution)

    def __post_init__(self) -> None:
        if self.kind not in (NORMAL_MASK, IMAGE):
            raise GuidanceInputError(f"StageInput.kind: expected {NORMAL_MASK!r} or {IMAGE!r}, got {self.kind!r}")
        if self.kind == NORMAL_MASK and (not isinstance(self.size, int) or self.size <= 0):
            raise GuidanceInputError(f"StageInput.size: {NORMAL_MASK} needs a positive latent side, got {self.size!r}")


@dataclass
class GuidanceEnv:
    """What a guidance factory gets: the run's config and device, and the phase's renderer of
    cfg.target_mesh (built when called: it loads the mesh, so guidances that need none never do)."""
    cfg: Config
    device: torch.device
    target_renderer: Callable[[], TargetRenderer]


class Guidance(Protocol):
    def stage_input(self, stage: str) -> StageInput: ...

    def draw(self, stage: str, it: int, cams: CameraBatch, generator: torch.Generator) -> SdsDraw:
        """The step's render-independent random draw (time steps, noise, weights)."""

    def sds(self, x: torch.Tensor, stage: str, it: int, cams: CameraBatch, generator: torch.Generator,
            draw: SdsDraw | None = None) -> SDSResult:
        """`x`: the phase's render in the stage's StageInput format, with gradients."""


def image_resolution(cfg: Config) -> int:
    """Square size a latent-diffusion guidance encodes (512 for the published train_res); its
    latents are 1/8 of it."""
    side = max(cfg.train_res)
    return max(8, (side // 8) * 8)


def latent_size(cfg: Config) -> int:
    """The coarse normal + mask latent's side for `cfg` (64 at the published 512 x 512)."""
    return image_resolution(cfg) // 8


def input_for(stage: str, cfg: Config) -> StageInput:
    """The published inputs, shared by the built-in guidances: the normal + mask latent in the
    coarse geometry stage, an encoded image otherwise."""
    return StageInput(NORMAL_MASK, latent_size(cfg)) if stage == "geometry_coarse" else StageInput(IMAGE)
