"""Pre-integrated split-sum FG table (computed by the project, cached under data/).

BRDF model (shared with EnvironmentLight.shade and the tests):
- GGX / Trowbridge-Reitz NDF with alpha = roughness^2:
  D(h) = alpha^2 / (pi ((n.h)^2 (alpha^2 - 1) + 1)^2)
- Smith height-correlated masking-shadowing, as a visibility term V = G / (4 n.l n.v):
  V = 0.5 / (n.l sqrt((n.v)^2 (1 - alpha^2) + alpha^2) + n.v sqrt((n.l)^2 (1 - alpha^2) + alpha^2))
- Schlick Fresnel F = F0 + (1 - F0) (1 - v.h)^5.
Then  integral f_spec (n.l) dl = F0 * FG0 + FG1  with
  FG0 = integral D V (1 - (1 - v.h)^5) (n.l) dl,   FG1 = integral D V (1 - v.h)^5 (n.l) dl.

Table layout: [256, 256, 2] float32, row i <-> roughness (i + 0.5) / 256, column j <-> n.v =
(j + 0.5) / 256, so that a clamp-mode bilinear lookup at uv = (n.v, roughness) returns the
table (this is how `shade` reads it). Integration: GGX importance sampling of the half
vector with a fixed 2-D Hammersley set (deterministic, float64), vectorized per roughness
row.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

LUT_RES = 256
LUT_SAMPLES = 8192
LUT_PATH = Path(__file__).resolve().parent.parent / "data" / f"fg_lut_ggx_smithcorr_{LUT_RES}.npy"

_log = logging.getLogger(__name__)
_CACHE: dict[str, torch.Tensor] = {}


class FGTableError(RuntimeError):
    """The cached FG table exists but cannot be used (wrong shape or values)."""


def hammersley(n: int) -> np.ndarray:
    """[n, 2] float64 low-discrepancy points in [0, 1)^2 (radical inverse base 2)."""
    i = np.arange(n, dtype=np.uint64)
    bits = i.copy()
    bits = ((bits << np.uint64(16)) | (bits >> np.uint64(16))) & np.uint64(0xFFFFFFFF)
    bits = ((bits & np.uint64(0x55555555)) << np.uint64(1)) | ((bits & np.uint64(0xAAAAAAAA)) >> np.uint64(1))
    bits = ((bits & np.uint64(0x33333333)) << np.uint64(2)) | ((bits & np.uint64(0xCCCCCCCC)) >> np.uint64(2))
    bits = ((bits & np.uint64(0x0F0F0F0F)) << np.uint64(4)) | ((bits & np.uint64(0xF0F0F0F0)) >> np.uint64(4))
    bits = ((bits & np.uint64(0x00FF00FF)) << np.uint64(8)) | ((bits & np.uint64(0xFF00FF00)) >> np.uint64(8))
    return np.stack([(i.astype(np.float64) + 0.5) / n, bits.astype(np.float64) / 2.0 ** 32], axis=1)


def smith_ggx_correlated_vis(n_dot_v: np.ndarray, n_dot_l: np.ndarray, alpha: float | np.ndarray) -> np.ndarray:
    """Height-correlated Smith visibility V = G2 / (4 n.l n.v) for GGX."""
    a2 = np.asarray(alpha) ** 2
    gv = n_dot_l * np.sqrt(n_dot_v * n_dot_v * (1.0 - a2) + a2)
    gl = n_dot_v * np.sqrt(n_dot_l * n_dot_l * (1.0 - a2) + a2)
    return 0.5 / np.maximum(gv + gl, 1e-300)


def integrate_fg(n_dot_v: np.ndarray, roughness: float, samples: int = LUT_SAMPLES) -> np.ndarray:
    """(FG0, FG1) for one roughness and a vector of n.v values: [len(n_dot_v), 2] float64."""
    alpha = max(roughness * roughness, 1e-6)
    xi = hammersley(samples)
    # GGX half-vector sampling with pdf D(h) (n.h); only n.h matters after the azimuth is
    # combined with v in the x-z plane.
    cos_h = np.sqrt((1.0 - xi[:, 0]) / (1.0 + (alpha * alpha - 1.0) * xi[:, 0]))
    sin_h = np.sqrt(np.maximum(1.0 - cos_h * cos_h, 0.0))
    phi = 2.0 * np.pi * xi[:, 1]
    h = np.stack([sin_h * np.cos(phi), sin_h * np.sin(phi), cos_h], axis=1)  # [S, 3]
    nv = n_dot_v[:, None]                                                    # [K, 1]
    v = np.stack([np.sqrt(1.0 - n_dot_v ** 2), np.zeros_like(n_dot_v), n_dot_v], axis=1)  # [K, 3]
    v_dot_h = v @ h.T                                                        # [K, S]
    n_dot_l = 2.0 * v_dot_h * h[None, :, 2] - nv                             # l = 2 (v.h) h - v
    ok = (n_dot_l > 0) & (v_dot_h > 0)
    nl = np.where(ok, n_dot_l, 0.0)
    vh = np.where(ok, v_dot_h, 0.0)
    # f (n.l) / pdf(l) with pdf(l) = D (n.h) / (4 v.h): D cancels.
    weight = 4.0 * smith_ggx_correlated_vis(nv, nl, alpha) * nl * vh / h[None, :, 2]
    fc = (1.0 - vh) ** 5
    weight = np.where(ok, weight, 0.0)
    return np.stack([(weight * (1.0 - fc)).mean(axis=1), (weight * fc).mean(axis=1)], axis=1)


def compute_fg_table(res: int = LUT_RES, samples: int = LUT_SAMPLES) -> np.ndarray:
    """[res, res, 2] float32 table (rows roughness, columns n.v, texel centres)."""
    centres = (np.arange(res, dtype=np.float64) + 0.5) / res
    rows = [integrate_fg(centres, float(r), samples) for r in centres]
    return np.stack(rows, axis=0).astype(np.float32)


def _atomic_save(path: Path, table: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, table)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is shared data
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _validate(table: np.ndarray, path: Path) -> None:
    if table.shape != (LUT_RES, LUT_RES, 2) or not np.isfinite(table).all() or table.min() < 0 or table.max() > 1.0 + 1e-3:
        raise FGTableError(
            f"FG table {path} has shape {table.shape} or values outside [0, 1]; expected "
            f"({LUT_RES}, {LUT_RES}, 2). Delete the file so that it is recomputed.")


def load_fg_table(path: Path = LUT_PATH) -> np.ndarray:
    """The cached table, computed and written (atomically) when the file does not exist."""
    if not path.exists():
        _log.info("computing the %dx%d FG table into %s", LUT_RES, LUT_RES, path)
        _atomic_save(path, compute_fg_table())
    try:
        table = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FGTableError(f"cannot read FG table {path}: {e}. Delete the file so that it is recomputed.") from e
    _validate(table, path)
    return table


def fg_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """[1, 256, 256, 2] float32 tensor on `device`, ready for texture_torch(..., 'clamp')."""
    key = str(torch.device(device))
    if key not in _CACHE:
        if "cpu" not in _CACHE:
            _CACHE["cpu"] = torch.from_numpy(load_fg_table())[None].contiguous()
        _CACHE[key] = _CACHE["cpu"].to(device)
    return _CACHE[key]


if __name__ == "__main__":
    # `python -m render.fg_lut` recomputes the committed table.
    _atomic_save(LUT_PATH, compute_fg_table())
    print(f"wrote {LUT_PATH}")
