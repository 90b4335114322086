"""Multi-resolution hash-grid encoding (instant-ngp), used by the SDF and material networks.

Layout (docs/DESIGN.md, "Conventions and formulas"): 16 levels x 2 features, table 2^19 entries per
level, base resolution 16, finest 4096, per-level scale b = exp(ln(4096/16)/15). Level l has
resolution N_l = floor(16 * b^l) cells per axis (N_l + 1 lattice points); inputs are normalized to
the AABB and clamped to [0, 1].
Levels whose dense lattice (N_l + 1)^3 fits in the table index it directly; finer levels use the
instant-ngp spatial hash (x*1 xor y*2654435761 xor z*805459861) mod 2^log2_hashmap_size.
Features are trilinearly interpolated and concatenated level by level: [N, 3] -> [N, L*F].

Backends (same parameter layout, so they can be compared on shared weights):
- "torch":  readable reference, any device, autograd for table and inputs;
- "triton": fused kernel (geometry/hashgrid_triton.py), the CUDA default;
- "tcnn":   tiny-cuda-nn's HashGrid, only when installed and explicitly requested.
"""
from __future__ import annotations

import torch
from torch import nn

from geometry.hashgrid_layout import PRIMES, GridLayout, HashGridOptions
from render.util import triton_interpreter_active

# The optional backends, imported here once; the reason one is missing is kept for the error that
# a request for it raises (make_encoder never falls back silently). Triton is GPU-only software:
# CPU machines often lack it. Importing the kernels fixes their compiled or interpreted mode from
# TRITON_INTERPRET, so a CPU check of the kernels sets it before importing this module.
try:
    from geometry.hashgrid_triton import hash_encode_triton
except ImportError as _err:
    hash_encode_triton = None
    _TRITON_MISSING: str | None = f"triton is not importable ({_err})"
else:
    _TRITON_MISSING = None

try:
    import tinycudann as tcnn
except ImportError as _err:
    tcnn = None
    _TCNN_MISSING: str | None = f"tiny-cuda-nn is not installed ({_err})"
else:
    _TCNN_MISSING = None

BACKENDS = ("auto", "torch", "triton", "tcnn")


class HashGridBackendError(RuntimeError):
    """The requested hash-grid backend cannot run here (missing package or device)."""


def published_adamw(params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """The published optimizer of the hash-grid networks (AdamW, betas 0.9/0.99, eps 1e-15).

    PyTorch's fused kernel on CPU and CUDA, where it has one: the hash table holds ~13M values, and
    the unfused update is a chain of table-sized ops (2 CPU cores: 77 ms a step, fused 4 ms). On
    CUDA the grad scaler also hands the fused kernel its inf check as a device tensor. Raises
    ValueError when the parameters live on several devices.
    """
    devices = {p.device for p in params}
    if len(devices) != 1:
        # A stray parameter on another device would silently cost the fused kernel (and the grad
        # scaler's host-free inf check): say so instead.
        raise ValueError(f"published_adamw: params must all live on one device; got {sorted(map(str, devices))}")
    fused = next(iter(devices)).type in ("cpu", "cuda")
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), eps=1e-15, fused=fused or None)


def normalize_to_aabb(x_nx3: torch.Tensor, aabb_2x3: torch.Tensor) -> torch.Tensor:
    """Map points to [0, 1]^3 inside the AABB; outside points are clamped (zero input gradient)."""
    return ((x_nx3 - aabb_2x3[0]) / (aabb_2x3[1] - aabb_2x3[0])).clamp(0.0, 1.0)


def _corner_offsets(device: torch.device) -> torch.Tensor:
    """[8, 3] corner c has offsets (c & 1, c >> 1 & 1, c >> 2 & 1): the order the kernel uses."""
    c = torch.arange(8, device=device)
    return torch.stack([c & 1, c >> 1 & 1, c >> 2 & 1], dim=1)


def grid_index(ijk_nx3: torch.Tensor, res: int, dense: bool, hash_size: int) -> torch.Tensor:
    """Row within one level of integer lattice points [..., 3] int64."""
    i, j, k = ijk_nx3.unbind(-1)
    if dense:
        return i + j * (res + 1) + k * (res + 1) ** 2
    # int64 products keep the low 32 bits exact, so masking equals the uint32 hash mod 2^log2.
    h = (i * PRIMES[0]) ^ (j * PRIMES[1]) ^ (k * PRIMES[2])
    return h & (hash_size - 1)


def hash_encode_torch(x01_nx3: torch.Tensor, table_rxf: torch.Tensor, layout: GridLayout,
                      levels: int | None = None) -> torch.Tensor:
    """Reference encoding of normalized points [N, 3] in [0, 1] -> [N, L*F]; differentiable in both.

    `levels`: only the coarsest `levels` levels are looked up; the finer ones' features are 0 (and
    their rows get no gradient), as masking them would give, without their gathers and scatters.

    All levels' corner rows are gathered with one index_select: its backward builds one
    table-sized gradient (one index_add) instead of one per (level, corner), which dominated the
    step time, and on the CPU it takes half the time of advanced indexing's gather + index_put
    (50 vs 97 ms for 10240 points, 2 cores). The per-corner accumulation order mirrors the Triton
    kernel so the two agree to rounding.
    """
    corners = _corner_offsets(x01_nx3.device)                                    # [8, 3]
    rows, weights = [], []
    n_levels = len(layout.resolutions)
    used = n_levels if levels is None else levels
    for lvl, res in enumerate(layout.resolutions[:used]):
        pos = x01_nx3 * float(res)  # [N, 3] lattice coordinates
        # Clamp the cell so x = 1 interpolates inside the last cell (weight 1 on its far corner).
        cell = torch.clamp(torch.floor(pos), max=float(res - 1)).detach()
        frac = pos - cell  # d frac / d pos = 1: carries the input gradient
        ijk = cell.long()[:, None, :] + corners                                  # [N, 8, 3]
        rows.append(grid_index(ijk, res, layout.dense[lvl], layout.hash_size) + layout.offsets[lvl])
        w3 = torch.where(corners.bool(), frac[:, None, :], 1.0 - frac[:, None, :])  # [N, 8, 3]
        weights.append(w3[..., 0] * w3[..., 1] * w3[..., 2])                     # [N, 8]
    rows_nxlx8 = torch.stack(rows, dim=1)
    feats = table_rxf.index_select(0, rows_nxlx8.reshape(-1))                  # [N * L * 8, F]
    feats = feats.reshape(*rows_nxlx8.shape, table_rxf.shape[1])                # [N, L, 8, F]
    w = torch.stack(weights, dim=1)                                              # [N, L, 8]
    acc = w[:, :, 0, None] * feats[:, :, 0]
    for c in range(1, 8):
        acc = acc + w[:, :, c, None] * feats[:, :, c]                            # [N, used, F]
    if used < n_levels:
        acc = torch.cat([acc, acc.new_zeros(acc.shape[0], n_levels - used, acc.shape[2])], dim=1)
    return acc.reshape(acc.shape[0], acc.shape[1] * acc.shape[2])              # explicit: N may be 0


def zero_finer_levels(feat_nxd: torch.Tensor, levels: int | None, n_levels: int) -> torch.Tensor:
    """[N, L*F] features with the levels from `levels` on (finest) set to 0; None: unchanged."""
    if levels is None or levels >= n_levels:
        return feat_nxd
    mask = torch.zeros(feat_nxd.shape[1], dtype=feat_nxd.dtype, device=feat_nxd.device)
    mask[:levels * (feat_nxd.shape[1] // n_levels)] = 1.0   # level by level, coarsest first
    return feat_nxd * mask


def _check_levels(levels: int | None, n_levels: int) -> None:
    if levels is not None and (isinstance(levels, bool) or not isinstance(levels, int) or not 1 <= levels <= n_levels):
        raise ValueError(f"hash grid: 'levels' must be None or an int in [1, {n_levels}]; got {levels!r}")


class HashGridEncoder(nn.Module):
    """Shared state of the table-owning backends: options, layout, AABB and the table [rows, F]."""

    backend = "torch"

    def __init__(self, aabb_2x3: torch.Tensor, opts: HashGridOptions) -> None:
        super().__init__()
        _check_aabb(aabb_2x3)
        self.opts = opts
        self.layout = GridLayout.from_options(opts)
        self.register_buffer("aabb", aabb_2x3.detach().to(torch.float32).clone())
        table = torch.empty(self.layout.rows, opts.n_features_per_level, device=aabb_2x3.device)
        self.table = nn.Parameter(table.uniform_(-opts.init_scale, opts.init_scale))

    @property
    def output_dim(self) -> int:
        return self.opts.output_dim

    def forward(self, x_nx3: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        """[N, 3] world points -> [N, L*F]; `levels`: the coarsest levels used (the rest are 0)."""
        _check_points(x_nx3)
        _check_levels(levels, self.opts.n_levels)
        x01 = normalize_to_aabb(x_nx3, self.aabb.to(x_nx3.dtype))
        return hash_encode_torch(x01, self.table.to(x_nx3.dtype), self.layout, levels)


class TritonHashGridEncoder(HashGridEncoder):
    """Same parameters as the reference; forward/backward by the fused Triton kernel."""

    backend = "triton"

    def __init__(self, aabb_2x3: torch.Tensor, opts: HashGridOptions) -> None:
        if _TRITON_MISSING:
            raise HashGridBackendError(f"TritonHashGridEncoder: {_TRITON_MISSING}")
        super().__init__(aabb_2x3, opts)

    def forward(self, x_nx3: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        _check_points(x_nx3)
        _check_levels(levels, self.opts.n_levels)
        _check_triton_device(x_nx3.device)
        # The kernel visits every level; on the GPU that costs little next to the masked result.
        return zero_finer_levels(hash_encode_triton(x_nx3, self.table, self.aabb, self.layout), levels,
                                 self.opts.n_levels)


class TcnnHashGridEncoder(nn.Module):
    """tiny-cuda-nn HashGrid. Its lattice convention (scale - 1, +0.5 offset) differs slightly
    from the reference, so weights are not interchangeable with the other backends."""

    backend = "tcnn"

    def __init__(self, aabb_2x3: torch.Tensor, opts: HashGridOptions) -> None:
        super().__init__()
        reason = tcnn_unavailable_reason(aabb_2x3.device)
        if reason:
            raise HashGridBackendError(f"TcnnHashGridEncoder: {reason}")
        _check_aabb(aabb_2x3)
        self.opts = opts
        self.register_buffer("aabb", aabb_2x3.detach().to(torch.float32).clone())
        self.encoding = tcnn.Encoding(3, {
            "otype": "HashGrid", "n_levels": opts.n_levels,
            "n_features_per_level": opts.n_features_per_level,
            "log2_hashmap_size": opts.log2_hashmap_size,
            "base_resolution": opts.base_resolution, "per_level_scale": opts.per_level_scale})

    @property
    def output_dim(self) -> int:
        return self.opts.output_dim

    def forward(self, x_nx3: torch.Tensor, levels: int | None = None) -> torch.Tensor:
        _check_points(x_nx3)
        _check_levels(levels, self.opts.n_levels)
        feat = self.encoding(normalize_to_aabb(x_nx3, self.aabb)).float()  # tcnn returns fp16
        return zero_finer_levels(feat, levels, self.opts.n_levels)


def make_encoder(aabb_2x3: torch.Tensor, opts: HashGridOptions | None = None,
                 backend: str = "auto") -> nn.Module:
    """Hash-grid encoder [N, 3] -> [N, opts.output_dim] on aabb's device; `.backend` says which.

    "auto": "triton" when the AABB is on CUDA and triton imports, else "torch". An explicitly
    requested backend that cannot run raises HashGridBackendError; there is no silent fallback.
    """
    opts = opts or HashGridOptions()
    if backend not in BACKENDS:
        raise ValueError(f"make_encoder: 'backend' must be one of {BACKENDS}; got {backend!r}")
    device = aabb_2x3.device
    if backend == "auto":
        backend = "triton" if device.type == "cuda" and triton_unavailable_reason() is None else "torch"
    if backend == "torch":
        return HashGridEncoder(aabb_2x3, opts)
    if backend == "triton":
        reason = triton_unavailable_reason()
        if reason:
            raise HashGridBackendError(f"hash-grid backend 'triton' requested but {reason}; "
                                       "install triton or use backend='torch'")
        _check_triton_device(device)
        if opts.n_features_per_level & (opts.n_features_per_level - 1):
            raise HashGridBackendError(
                f"hash-grid backend 'triton' needs n_features_per_level to be a power of two; "
                f"got {opts.n_features_per_level}")
        return TritonHashGridEncoder(aabb_2x3, opts)
    reason = tcnn_unavailable_reason(device)
    if reason:
        raise HashGridBackendError(f"hash-grid backend 'tcnn' requested but {reason}; "
                                   "use backend='triton' or 'torch'")
    return TcnnHashGridEncoder(aabb_2x3, opts)


def triton_unavailable_reason() -> str | None:
    """Why the Triton kernels cannot be used in this process (None: they can)."""
    return _TRITON_MISSING


def tcnn_unavailable_reason(device: torch.device) -> str | None:
    """Why tiny-cuda-nn cannot encode points on `device` (None: it can)."""
    if _TCNN_MISSING:
        return _TCNN_MISSING
    if device.type != "cuda":
        return f"tiny-cuda-nn runs on CUDA only and the AABB is on {device}"
    return None


def _check_triton_device(device: torch.device) -> None:
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter_active()):
        return
    raise HashGridBackendError(
        f"hash-grid backend 'triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU testing); "
        f"got device {device}")


def _check_aabb(aabb_2x3: torch.Tensor) -> None:
    if aabb_2x3.shape != (2, 3):
        raise ValueError(f"hash grid: 'aabb' must be [2, 3] (min, max); got {tuple(aabb_2x3.shape)}")
    if not bool(torch.isfinite(aabb_2x3).all()) or not bool((aabb_2x3[1] > aabb_2x3[0]).all()):
        raise ValueError(f"hash grid: 'aabb' must be finite with max > min per axis; "
                         f"got {aabb_2x3.tolist()}")


def _check_points(x_nx3: torch.Tensor) -> None:
    if x_nx3.ndim != 2 or x_nx3.shape[1] != 3:
        raise ValueError(f"hash grid: input must be [N, 3]; got {tuple(x_nx3.shape)}")
