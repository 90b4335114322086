"""What a training phase provides to the loop in trainer.py, and the helpers both phases share.

A phase turns one camera batch into a loss whose gradient is the SDS gradient (`step`), reads its
own device values one step late (`read_step`), renders validation views and a turntable, exports
its result, and saves and loads its state. docs/DESIGN.md, "Modules and imports".
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import numpy as np
import torch

import guidance.stable_diffusion  # noqa: F401  registers guidance=stable_diffusion
import guidance.target_mesh  # noqa: F401  registers guidance=target_mesh
import progress
from config import Config
from dataset.cameras import CameraBatch
from geometry.hashgrid_layout import HashGridOptions
from guidance import registry
from guidance.base import Guidance, GuidanceEnv, TargetRenderer


@dataclass
class StepResult:
    loss: torch.Tensor              # 0-dim; backward() puts the SDS gradient into the parameters
    sds: Any                        # the sd.SDSResult: its device-side stats are read one step later
    # The phase's values for the log (device tensors, or CPU tensors that go with them): read one
    # step later, so the host never waits for them, and turned into log entries by
    # phase.read_step. Taken from the last micro-step: they describe the step's parameters, which
    # micro-steps share.
    device_values: dict[str, torch.Tensor] = field(default_factory=dict)


class Phase(Protocol):
    name: str
    lr: float
    prepare_activity: str           # what prepare() does, for the ending's "stopped during ..."

    def parameters(self) -> list[torch.nn.Parameter]: ...
    def stage(self, it: int) -> str: ...
    def prepare(self, resumed: bool) -> None: ...
    def step(self, it: int, cams: CameraBatch, generator: torch.Generator) -> StepResult: ...
    def read_step(self, it: int, values: dict[str, list[float]]) -> dict[str, float]: ...
    def validation_images(self, cams: CameraBatch) -> dict[str, np.ndarray]: ...
    def turntable_frames(self, cams: CameraBatch) -> np.ndarray: ...
    def export(self, out_dir: Path) -> list[Path]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def encoder_options(cfg: Config) -> HashGridOptions:
    """The hash grid of both phases' networks: the published architecture, with the table size of
    hash_table_log2."""
    return HashGridOptions(log2_hashmap_size=cfg.hash_table_log2)


def make_guidance(cfg: Config, device: torch.device, target_renderer: Callable[[], TargetRenderer]) -> Guidance:
    """The guidance the config names (guidance.registry), for a phase whose renderer of the
    target mesh `target_renderer` builds."""
    return registry.build(GuidanceEnv(cfg, device, target_renderer))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[..., C] floats in [0, 1] -> uint8 numpy."""
    return (images.detach().clamp(0, 1) * 255 + 0.5).to(torch.uint8).cpu().numpy()


def camera_chunks(cams: CameraBatch, size: int) -> Iterator[CameraBatch]:
    """Consecutive sub-batches of at most `size` cameras (bounded memory for long turntables)."""
    for i in range(0, len(cams), size):
        yield CameraBatch(**{f: (v if f in ("resolution", "stream") else v[i:i + size]) for f, v in vars(cams).items()})


def render_turntable(cams: CameraBatch, render: Callable[[CameraBatch], np.ndarray], chunk: int = 8) -> np.ndarray:
    """The turntable's frames [N, H, W, 3] uint8, rendered `chunk` cameras at a time, with a
    progress bar (hundreds of frames at display resolution take a while)."""
    frames = []
    with contextlib.closing(progress.bar(len(cams), "video frames", unit="frame")) as bar:
        for part in camera_chunks(cams, chunk):
            frames.append(render(part))
            bar.update(len(part))
    return np.concatenate(frames)
