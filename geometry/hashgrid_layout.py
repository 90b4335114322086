"""The hash grid's options and table layout (docs/DESIGN.md, "Conventions and formulas").

Shared by the reference encoder (geometry/hashgrid.py) and the Triton kernels
(geometry/hashgrid_triton.py); a module of its own so that the encoder can import the kernels at
its top without the kernels importing the encoder back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

# instant-ngp's spatial hash: x*1 xor y*2654435761 xor z*805459861.
PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True)
class HashGridOptions:
    n_levels: int = 16
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 16
    finest_resolution: int = 4096
    init_scale: float = 1e-4  # table ~ U(-init_scale, init_scale), as tiny-cuda-nn

    def __post_init__(self) -> None:
        for name in ("n_levels", "n_features_per_level", "log2_hashmap_size", "base_resolution",
                     "finest_resolution"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HashGridOptions.{name}: expected a positive int; got {value!r}")
        if self.finest_resolution < self.base_resolution:
            raise ValueError(f"HashGridOptions.finest_resolution: expected >= base_resolution "
                             f"({self.base_resolution}); got {self.finest_resolution}")
        if self.log2_hashmap_size > 30:
            raise ValueError(f"HashGridOptions.log2_hashmap_size: expected <= 30; "
                             f"got {self.log2_hashmap_size}")

    @property
    def per_level_scale(self) -> float:
        if self.n_levels == 1:
            return 1.0
        return math.exp(math.log(self.finest_resolution / self.base_resolution) / (self.n_levels - 1))

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features_per_level

    def level_resolutions(self) -> list[int]:
        """Cells per axis N_l = floor(base * b^l); the 1e-6 guards 4095.9999 -> 4096 round-off."""
        b = self.per_level_scale
        return [int(math.floor(self.base_resolution * b ** lvl * (1 + 1e-9) + 1e-6))
                for lvl in range(self.n_levels)]


@dataclass(frozen=True)
class GridLayout:
    """Where each level lives in the flat parameter table [rows, F]."""
    resolutions: tuple[int, ...]
    sizes: tuple[int, ...]  # rows per level
    offsets: tuple[int, ...]  # first row per level
    dense: tuple[bool, ...]
    hash_size: int
    rows: int = field(default=0)

    @staticmethod
    def from_options(opts: HashGridOptions) -> "GridLayout":
        hash_size = 2 ** opts.log2_hashmap_size
        res = opts.level_resolutions()
        dense = tuple((n + 1) ** 3 <= hash_size for n in res)
        sizes = tuple((n + 1) ** 3 if d else hash_size for n, d in zip(res, dense))
        offsets = tuple(sum(sizes[:i]) for i in range(len(sizes)))
        return GridLayout(tuple(res), sizes, offsets, dense, hash_size, sum(sizes))
