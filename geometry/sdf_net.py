"""SDF network: hash-grid encoding + small MLP -> (sdf, deformation) per point
(docs/DESIGN.md, "Conventions and formulas")."""
from __future__ import annotations

import torch
from torch import nn

from geometry.hashgrid import HashGridOptions, make_encoder


class SDFNetwork(nn.Module):
    """[N, 3] world points -> (sdf [N], deform [N, 3]); sdf < 0 inside.

    MLP: 32 wide, 2 hidden ReLU layers, 4 outputs. It always runs in fp32 (autocast disabled)
    because SDF values near the surface and the small deformations lose too much in fp16.

    `set_active_levels(k)` zeroes the features of the hash grid's levels k and finer (coarse to
    fine, as threestudio's progressive hash grid): the SDF can then vary only at the scale of the
    coarse levels, and the masked levels' table rows get no gradient until they are opened. The
    PyTorch encoder then skips those levels' lookups altogether.
    """

    def __init__(self, aabb_2x3: torch.Tensor, encoder_opts: HashGridOptions | None = None,
                 backend: str = "auto", width: int = 32, n_hidden: int = 2) -> None:
        super().__init__()
        self.encoder = make_encoder(aabb_2x3, encoder_opts or HashGridOptions(), backend)
        dims = [self.encoder.output_dim] + [width] * n_hidden
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(d_in, d_out), nn.ReLU(inplace=True)]
        layers.append(nn.Linear(width, 4))
        self.mlp = nn.Sequential(*layers).to(aabb_2x3.device)
        self.n_levels = self.encoder.opts.n_levels
        self.active_levels = self.n_levels

    def set_active_levels(self, k: int) -> None:
        """Use only the `k` coarsest hash-grid levels (1 <= k <= n_levels; n_levels: all)."""
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.n_levels:
            raise ValueError(f"SDFNetwork.set_active_levels: expected an int in [1, {self.n_levels}]; got {k!r}")
        if k == self.active_levels:
            return
        self.active_levels = k

    @property
    def backend(self) -> str:
        return self.encoder.backend

    def forward(self, x_nx3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(device_type=x_nx3.device.type, enabled=False):
            levels = None if self.active_levels == self.n_levels else self.active_levels
            feat = self.encoder(x_nx3.float(), levels=levels).float()         # [N, L * F]
            out_nx4 = self.mlp(feat)
        return out_nx4[:, 0], out_nx4[:, 1:]
