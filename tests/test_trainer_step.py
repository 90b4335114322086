"""trainer.StepResult deferred form: host values read after the backward, in one transfer."""
import math

import pytest
import torch

from sd import sds_from_eps
from trainer import StepResult, Trainer


def _sds(bad: bool):
    latents = torch.randn(1, 4, 2, 2, requires_grad=True)
    noise, eps_hat = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    if bad:
        eps_hat[0, 0, 0, 0] = float("nan")
    return latents, sds_from_eps(latents, noise, torch.tensor([5]), eps_hat, torch.tensor([1.0]))


def test_step_result_needs_values_or_sds() -> None:
    with pytest.raises(TypeError, match="sds"):
        StepResult(loss=torch.zeros(()))
    eager = StepResult(loss=torch.zeros(()), loss_value=1.0, nonfinite=0, skipped=False)
    assert not eager.deferred


def test_deferred_results_read_together_after_backward() -> None:
    (_, ok), (lat_bad, bad) = _sds(False), _sds(True)
    results = [StepResult(loss=ok.loss, sds=ok), StepResult(loss=bad.loss, sds=bad, extra={"x": 1.0})]
    assert all(r.deferred for r in results)
    for r in results:                                   # the trainer queues every backward first
        r.loss.backward()
    assert torch.equal(lat_bad.grad, torch.zeros_like(lat_bad))      # skipped: zeros injected
    az = [torch.tensor([0.0, math.pi / 2]), torch.tensor([-math.pi / 2])]
    degrees = Trainer._read_host_values(results, az)
    assert degrees == pytest.approx([0.0, 90.0, -90.0])
    assert results[0].skipped is False and results[0].nonfinite == 0
    assert results[0].loss_value == pytest.approx(ok.stats[1].item())
    assert results[1].skipped is True and results[1].nonfinite == 1 and math.isnan(results[1].loss_value)
    assert not any(r.deferred for r in results)
