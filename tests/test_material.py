"""Material MLP ranges and bump-mapped normals."""
import pytest
import torch
from torch import nn

from render.material import MaterialError, MaterialMLP, perturb_normal

PUBLISHED = dict(kd_min=[0.0, 0.0, 0.0, 0.0], kd_max=[1.0, 1.0, 1.0, 1.0], ks_min=[0.0, 0.08, 0.0],
                 ks_max=[1.0, 1.0, 1.0], nrm_min=[-1.0, -1.0, 0.0], nrm_max=[1.0, 1.0, 1.0])


class FourierEncoder(nn.Module):
    """Stand-in for the hash grid: any [N, 3] -> [N, F] module with n_output_dims."""

    def __init__(self, freqs: int = 4) -> None:
        super().__init__()
        self.register_buffer("scales", 2.0 ** torch.arange(freqs))
        self.n_output_dims = 6 * freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x[:, :, None] * self.scales
        return torch.cat([torch.sin(z), torch.cos(z)], -1).reshape(x.shape[0], -1)


def test_outputs_always_inside_configured_ranges():
    torch.manual_seed(0)
    ranges = dict(kd_min=[0.1, 0.2, 0.0], kd_max=[0.9, 0.5, 0.3], ks_min=[0.0, 0.08, 0.0],
                  ks_max=[0.5, 0.9, 0.2], nrm_min=[-0.5, -0.5, 0.2], nrm_max=[0.5, 0.5, 1.0])
    mat = MaterialMLP(FourierEncoder(), **ranges)
    with torch.no_grad():  # drive the sigmoids into saturation on purpose
        for p in mat.net.parameters():
            p.mul_(200.0)
    out = mat(torch.randn(4096, 3) * 3)
    for key, lo, hi in (("kd", "kd_min", "kd_max"), ("ks", "ks_min", "ks_max"), ("nrm", "nrm_min", "nrm_max")):
        v = out[key]
        assert v.shape == (4096, 3)
        assert (v >= torch.tensor(ranges[lo]) - 1e-6).all() and (v <= torch.tensor(ranges[hi]) + 1e-6).all(), key
    assert out["kd"].std(0).min() > 0  # saturated but still varying


def test_published_defaults_accept_four_kd_values_and_train():
    mat = MaterialMLP(FourierEncoder(), **PUBLISHED)
    pts = torch.rand(64, 3)
    out = mat(pts)
    loss = sum(v.square().mean() for v in out.values())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in mat.net.parameters())
    assert (out["ks"][:, 1] >= 0.08).all() and (out["nrm"][:, 2] >= 0).all()


def test_invalid_configurations_raise():
    with pytest.raises(MaterialError, match="kd_min"):
        MaterialMLP(FourierEncoder(), **{**PUBLISHED, "kd_min": [0.0, 0.0]})
    with pytest.raises(MaterialError, match="min > max"):
        MaterialMLP(FourierEncoder(), **{**PUBLISHED, "ks_min": [0.0, 1.0, 0.0], "ks_max": [1.0, 0.5, 1.0]})
    with pytest.raises(MaterialError, match="n_output_dims"):
        MaterialMLP(nn.Identity(), **PUBLISHED)
    with pytest.raises(MaterialError, match=r"\[N, 3\]"):
        MaterialMLP(FourierEncoder(), **PUBLISHED)(torch.rand(4, 2))


def test_perturbed_normal_is_unit_and_follows_the_frame():
    torch.manual_seed(0)
    n = torch.nn.functional.normalize(torch.randn(1000, 3), dim=-1)
    t = torch.randn(1000, 3)  # not orthogonal to n on purpose
    nrm = torch.rand(1000, 3) * torch.tensor([2.0, 2.0, 1.0]) - torch.tensor([1.0, 1.0, 0.0])
    nrm[:10] = 0.0  # degenerate perturbation -> falls back to the surface normal
    out = perturb_normal(nrm, n, t)
    assert torch.allclose(out.norm(dim=-1), torch.ones(1000), atol=1e-5)
    assert torch.allclose(out[:10], n[:10], atol=1e-6)
    flat = perturb_normal(torch.tensor([[0.0, 0.0, 1.0]]).expand(1000, 3), n, t)
    assert torch.allclose(flat, n, atol=1e-5)
    # +x in tangent space tilts toward the tangent.
    tilted = perturb_normal(torch.tensor([[0.5, 0.0, 1.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert torch.allclose(tilted, torch.nn.functional.normalize(torch.tensor([[0.5, 0.0, 1.0]]), dim=-1), atol=1e-6)
    # -B * n.y with B = T x N: +y in tangent space tilts toward +y here (T = x, N = z, B = -y).
    tilted_y = perturb_normal(torch.tensor([[0.0, 0.5, 1.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0]]))
    assert tilted_y[0, 1] > 0
