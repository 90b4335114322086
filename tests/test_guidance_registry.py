"""A guidance is one module plus a registration: a guidance defined here, in the test file only,
drives a geometry run and an appearance run through the unchanged project code."""
from __future__ import annotations

import json
from pathlib import Path

import imageio.v3 as iio
import pytest
import torch
import torch.nn.functional as F

from config import ConfigError, build_config
from dataset.cameras import CameraBatch
from guidance import registry
from guidance.base import IMAGE, NORMAL_MASK, GuidanceEnv, StageInput, input_for
from guidance.target_mesh import scaled_linear_alphas_cumprod
from sd import SDSResult, SdsDraw, draw_sds, sds_from_eps
from tests.run_helpers import read_log, run_train, write_config

NAME = "constant_target"
RED = (0.9, 0.1, 0.1)   # the appearance target: a red image wherever it looks


class ConstantTarget:
    """The exact denoiser of one constant image: a red picture (images), or a fully covered
    silhouette facing the camera (the normal + mask latent). Records the inputs it was given."""

    def __init__(self, env: GuidanceEnv) -> None:
        self.cfg = env.cfg
        self.alphas = scaled_linear_alphas_cumprod().to(env.device)
        self.seen: list[tuple[str, str, tuple[int, ...]]] = []   # (stage, kind, input shape)
        ConstantTarget.last = self

    def stage_input(self, stage: str) -> StageInput:
        return input_for(stage, self.cfg)

    def _latents(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        return F.avg_pool2d(x * 2 - 1, 8) if self.stage_input(stage).kind == IMAGE else x

    def _target(self, like: torch.Tensor, stage: str) -> torch.Tensor:
        if self.stage_input(stage).kind == NORMAL_MASK:   # normal (0, 0, 1) towards the camera, covered
            return torch.tensor([0.0, 0.0, 1.0, 1.0]).view(1, 4, 1, 1).expand_as(like)
        return (torch.tensor(RED) * 2 - 1).view(1, 3, 1, 1).expand_as(like)

    def draw(self, stage: str, it: int, cams: CameraBatch, generator: torch.Generator) -> SdsDraw:
        spec = self.stage_input(stage)
        h, w = cams.resolution
        shape = (len(cams), 4, spec.size, spec.size) if spec.kind == NORMAL_MASK else (len(cams), 3, h // 8, w // 8)
        c = self.cfg
        return draw_sds(self.alphas, shape, stage, it, c.coarse_iter, c.early_time_step_range, c.late_time_step_range,
                        c.sds_weight_strategy, generator, self.alphas.device)

    def sds(self, x: torch.Tensor, stage: str, it: int, cams: CameraBatch, generator: torch.Generator,
            draw: SdsDraw | None = None) -> SDSResult:
        self.seen.append((stage, self.stage_input(stage).kind, tuple(x.shape)))
        latents = self._latents(x, stage)
        draw = draw or self.draw(stage, it, cams, generator)
        z_t = draw.add_noise(latents.detach())
        eps_hat = (z_t - draw.sqrt_a * self._target(latents, stage)) / draw.sqrt_1ma
        return sds_from_eps(latents, draw.noise, draw.t, eps_hat, draw.w)


@pytest.fixture
def constant_guidance():
    registry.register(NAME)(ConstantTarget)
    yield ConstantTarget
    registry.unregister(NAME)


def _geometry(folder: Path) -> dict:
    return {"mode": "geometry_modeling", "device": "cpu", "guidance": NAME, "sdf_init_shape": "ellipsoid",
            "sdf_init_shape_scale": [1, 1, 1], "sdf_init_iter": 80, "iter": 6, "coarse_iter": 3,
            "save_interval": 6, "train_res": [64, 64], "batch": 1, "dmtet_grid": 32, "mesh_scale": 2.3,
            "validate": False, "video_frames": 0, "tensorboard": "off", "hash_table_log2": 16,
            "out_dir": str(folder / "geometry")}


@pytest.mark.slow
def test_a_registered_guidance_drives_both_phases(tmp_path: Path, constant_guidance) -> None:
    geometry = _geometry(tmp_path)
    assert run_train(write_config(tmp_path, geometry, "geometry.json")) == 0
    seen = constant_guidance.last.seen
    # The phase rendered what the guidance asked for in each stage: the 8x8 normal + mask latent
    # (64 / 8) while coarse, the 64x64 normal image after.
    assert seen[0] == ("geometry_coarse", NORMAL_MASK, (1, 4, 8, 8))
    assert seen[-1] == ("geometry_fine", IMAGE, (1, 3, 64, 64))
    assert len(seen) == geometry["iter"]
    mesh = Path(geometry["out_dir"]) / "dmtet_mesh" / "mesh.obj"
    assert mesh.is_file()

    appearance = {"mode": "appearance_modeling", "device": "cpu", "guidance": NAME, "base_mesh": str(mesh),
                  "iter": 25, "coarse_iter": 0, "save_interval": 25, "train_res": [64, 64], "texture_res": [64, 64],
                  "batch": 1, "env_res": 64, "validate": False, "video_frames": 0, "tensorboard": "off",
                  "sds_weight_strategy": 1, "hash_table_log2": 16, "out_dir": str(tmp_path / "appearance")}
    assert run_train(write_config(tmp_path, appearance, "appearance.json")) == 0
    kinds = {(stage, kind) for stage, kind, _ in constant_guidance.last.seen}
    assert kinds == {("appearance", IMAGE)}
    log = read_log(tmp_path / "appearance")
    assert len(log) == 25 and all(not r["skipped"] for r in log)
    # The guidance's target is red: the baked albedo turned red where the mesh is covered.
    from_mtl = _baked_kd_mean(tmp_path / "appearance" / "dmtet_mesh")
    assert from_mtl[0] > from_mtl[1] + 0.1 and from_mtl[0] > from_mtl[2] + 0.1, from_mtl


def _baked_kd_mean(mesh_dir: Path) -> list[float]:
    kd = iio.imread(mesh_dir / "texture_kd.png")[..., :3].reshape(-1, 3).astype(float) / 255
    covered = kd.sum(axis=1) > 0
    return kd[covered].mean(axis=0).tolist()


def test_an_unregistered_guidance_is_a_config_error_with_the_nearest_name() -> None:
    with pytest.raises(ConfigError, match=r"did you mean \"target_mesh\""):
        build_config({"guidance": "target_mseh", "target_mesh": "x.obj"})
    with pytest.raises(ValueError, match="already registered"):
        registry.register("target_mesh")(lambda env: None)
    assert json.dumps(registry.names()[:2]) == json.dumps(list(registry.BUILTIN))
