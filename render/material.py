"""PBR material network: position encoder + small MLP -> kd, ks, tangent-space normal.

The encoder is passed in (render/ never imports geometry/): any nn.Module mapping points
[N, 3] -> features [N, F] with an integer attribute `n_output_dims` (or `output_dim`) = F,
e.g. the hash grid of geometry/hashgrid.py. Outputs go through a sigmoid and are mapped per channel into the
configured [min, max] boxes, so they can never leave the physical ranges.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from render.util import dot, safe_normalize


class MaterialError(ValueError):
    """Invalid material network configuration."""


def _range_tensor(name: str, values: Sequence[float] | Tensor) -> Tensor:
    """Accept 3 values, or 4 for kd (the published configs carry an alpha entry; only RGB is
    predicted, so the fourth is dropped)."""
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() == 4 and name.startswith("kd"):
        t = t[:3]
    if t.numel() != 3:
        raise MaterialError(f"{name} must have 3 values{' (or 4 for kd)' if name.startswith('kd') else ''}, got {t.numel()}: {t.tolist()}")
    if not torch.isfinite(t).all():
        raise MaterialError(f"{name} must be finite, got {t.tolist()}")
    return t


class MaterialMLP(nn.Module):
    """encoder -> MLP (`layers` hidden layers of width `hidden`, ReLU) -> 9 channels ->
    sigmoid -> per-channel [min, max]: kd (3), ks (3: occlusion, roughness, metallic),
    tangent-space normal (3)."""

    def __init__(self, encoder: nn.Module, kd_min: Sequence[float], kd_max: Sequence[float],
                 ks_min: Sequence[float], ks_max: Sequence[float], nrm_min: Sequence[float] = (-1.0, -1.0, 0.0),
                 nrm_max: Sequence[float] = (1.0, 1.0, 1.0), hidden: int = 32, layers: int = 2) -> None:
        super().__init__()
        # tiny-cuda-nn names the width n_output_dims; geometry/hashgrid.py names it output_dim.
        n_in = getattr(encoder, "n_output_dims", getattr(encoder, "output_dim", None))
        if isinstance(n_in, bool) or not isinstance(n_in, int) or n_in <= 0:
            raise MaterialError(f"encoder must expose a positive int attribute n_output_dims (or output_dim), got {n_in!r}")
        if hidden <= 0 or layers < 0:
            raise MaterialError(f"hidden must be > 0 and layers >= 0, got hidden={hidden}, layers={layers}")
        lo = torch.cat([_range_tensor("kd_min", kd_min), _range_tensor("ks_min", ks_min), _range_tensor("nrm_min", nrm_min)])
        hi = torch.cat([_range_tensor("kd_max", kd_max), _range_tensor("ks_max", ks_max), _range_tensor("nrm_max", nrm_max)])
        if (lo > hi).any():
            bad = [i for i in range(9) if lo[i] > hi[i]]
            raise MaterialError(f"min > max for material channels {bad}: min={lo.tolist()}, max={hi.tolist()}")
        self.encoder = encoder
        dims = [n_in] + [hidden] * layers
        mods: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            mods += [nn.Linear(a, b), nn.ReLU(inplace=True)]
        mods.append(nn.Linear(dims[-1], 9))
        self.net = nn.Sequential(*mods)
        self.register_buffer("out_min", lo)
        self.register_buffer("out_max", hi)

    def forward(self, points: Tensor) -> dict[str, Tensor]:
        """points [N, 3] -> {"kd": [N, 3], "ks": [N, 3], "nrm": [N, 3]} inside the ranges."""
        if points.dim() != 2 or points.shape[-1] != 3:
            raise MaterialError(f"points must have shape [N, 3], got {tuple(points.shape)}")
        feats = self.encoder(points)
        # The encoder may run in reduced precision (fused kernels); the MLP runs in fp32.
        raw = self.net(feats.float())
        out = self.out_min + (self.out_max - self.out_min) * torch.sigmoid(raw)
        return {"kd": out[:, 0:3], "ks": out[:, 3:6], "nrm": out[:, 6:9]}


def perturb_normal(nrm_tangent: Tensor, gb_normal: Tensor, gb_tangent: Tensor) -> Tensor:
    """Bump mapping: normalize(T * n.x - B * n.y + N * max(n.z, 0)) -> unit [..., 3].

    N = gb_normal; T = gb_tangent made orthogonal to N (interpolated tangents drift off the
    normal plane, which would skew the frame); B = normalize(cross(T, N)). Where the result
    degenerates (zero tangent-space normal), the unperturbed normal is returned."""
    n = safe_normalize(gb_normal)
    t = safe_normalize(gb_tangent - dot(gb_tangent, n) * n)
    b = safe_normalize(torch.cross(t, n, dim=-1))
    shading = t * nrm_tangent[..., 0:1] - b * nrm_tangent[..., 1:2] + n * nrm_tangent[..., 2:3].clamp(min=0.0)
    len2 = dot(shading, shading)
    ok = len2 > 1e-12
    return torch.where(ok, shading / torch.sqrt(len2.clamp(min=1e-12)), n)
