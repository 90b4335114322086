"""Trainer steps: host values read one step later, and non-finite SDS gradients skip the update.

A one-parameter phase makes the behaviour visible: its 'latents' are the parameter itself and its
guidance injects grad = w * (eps_hat - eps) with eps_hat = 0, or NaN on chosen iterations."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import distributed
from config import build_config
from phases.base import StepResult
from run_status import TrainingError
from sd import sds_from_eps
from trainer import HostCopy, Trainer, make_generators


class OneParameterPhase:
    name = "toy"
    lr = 0.1

    def __init__(self, nan_iterations: set[int], device: str = "cpu") -> None:
        self.p = torch.nn.Parameter(torch.ones(1, 4, 2, 2, device=device))
        self.nan_iterations = nan_iterations

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.p]

    def stage(self, it: int) -> str:
        return "geometry_coarse"

    def step(self, it: int, cams, generator: torch.Generator) -> StepResult:
        noise = torch.randn(self.p.shape, generator=generator, device=self.p.device)
        eps_hat = torch.zeros_like(noise)
        if it in self.nan_iterations:
            eps_hat[0, 0, 0, 0] = float("nan")
        sds = sds_from_eps(self.p, noise, torch.tensor([500], device=self.p.device), eps_hat,
                           torch.tensor([1.0], device=self.p.device))
        # A device value read one step late (as the geometry phase's surface size) and a host one.
        return StepResult(loss=sds.loss, sds=sds,
                          device_values={"p_sum": self.p.detach().sum(), "host": torch.tensor([it, 7])})

    def read_step(self, it: int, values: dict[str, list[float]]) -> dict[str, float]:
        assert values["host"] == [it, 7]
        return {"p_sum": values["p_sum"][0], "faces": 2.0}


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (grad scaler + fused AdamW path)")])]


def make_trainer(tmp_path: Path, phase: OneParameterPhase) -> Trainer:
    device = phase.p.device
    cfg = build_config({"mode": "geometry_modeling", "text": "a toy", "device": device.type, "iter": 30, "coarse_iter": 10, "save_interval": 10, "batch": 1,
                        "emulate_gpus": 2, "out_dir": str(tmp_path)})
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    with pytest.warns(UserWarning, match="sector"):
        return Trainer(cfg, info, phase, tmp_path, make_generators(cfg.seed, info))


def test_host_copy_keeps_order_and_values() -> None:
    values = HostCopy([torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([5.0], dtype=torch.float64)])
    assert values.tolist() == [[1.0, 2.0, 3.0, 4.0], [5.0]]


@pytest.mark.parametrize("device", DEVICES)
def test_record_is_read_after_the_step_is_queued(tmp_path: Path, device: str) -> None:
    phase = OneParameterPhase(nan_iterations=set(), device=device)
    trainer = make_trainer(tmp_path, phase)
    before = phase.p.detach().clone()
    step = trainer.train_step(1)
    assert not torch.equal(phase.p, before)                     # the update is applied (queued)
    assert (step.it, step.stage) == (1, "geometry_coarse")     # nothing read yet
    # CUDA: the step's start event is held for its log record (benchmarks time from it).
    assert (trainer.step_start_event(1) is None) == (device == "cpu")
    record = trainer.finish_step(step)
    assert record["it"] == 1 and record["nonfinite"] == 0 and not record["skipped"] and not record["stop"]
    assert record["faces"] == 2.0
    assert record["p_sum"] == pytest.approx(float(before.sum()))   # the value the step saw, not the update
    # Two emulated ranks on one process split the circle: [-45, 135) and [135, 315) (docs/DESIGN.md, "Training loop").
    (az_first, az_second), = record["azimuth_deg"]
    assert -45 <= az_first < 135 and (az_second >= 135 or az_second < -45)
    assert record["loss"] > 0 and math.isfinite(record["loss"])


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_guidance_skips_the_update_and_is_reported(tmp_path: Path, device: str) -> None:
    # CPU: the trainer's host check; CUDA: the grad scaler's device-side check (no host read).
    phase = OneParameterPhase(nan_iterations={2}, device=device)
    trainer = make_trainer(tmp_path, phase)
    trainer.finish_step(trainer.train_step(1))
    before = phase.p.detach().clone()
    record = trainer.finish_step(trainer.train_step(2))
    assert torch.equal(phase.p, before)                         # no update, nothing NaN applied
    # One NaN entry in each of the two micro-steps, summed over the optimizer step.
    assert record["skipped"] and record["nonfinite"] == 2 and math.isnan(record["loss"])
    assert trainer.skipped_total == 1
    record = trainer.finish_step(trainer.train_step(3))
    assert not record["skipped"] and not torch.equal(phase.p, before) and torch.isfinite(phase.p).all()
    assert trainer.consecutive_skips == 0


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path: Path) -> None:
    phase = OneParameterPhase(nan_iterations=set(range(1, 100)))
    trainer = make_trainer(tmp_path, phase)
    with pytest.raises(TrainingError, match="consecutive iterations up to 20 .*guidance_weight"):
        for it in range(1, 30):
            trainer.finish_step(trainer.train_step(it))
    assert torch.equal(phase.p, torch.ones_like(phase.p))
