"""Split-sum image-based lighting from an HDR environment map.

Pipeline (docs/DESIGN.md, "Conventions and formulas"): lat-long HDR -> cube map (512^2 faces by
default) -> box mip chain down to 16^2 -> specular levels prefiltered with GGX (N = V = R
assumption) for roughness 0.08 .. 0.5 linearly over the levels from the base down to 32^2, and the
last (16^2) level for roughness 1.0 -> diffuse irradiance (cosine convolution, divided by pi so that
a constant environment L gives L) computed from the coarsest box level.

Shading uses the pre-integrated FG table of render/fg_lut.py (GGX, height-correlated Smith,
Schlick Fresnel) and the same GGX NDF with alpha = roughness^2 in the prefilter.

Prefiltering is importance sampling of the GGX lobe with a fixed Hammersley set and
"filtered importance sampling" (each sample reads the source mip whose texel solid angle
matches the sample's share of the lobe), which keeps the sample count low without
aliasing. Brute force over all source texels is O(texels^2) and out of reach at 512^2.
"""
from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from render.fg_lut import fg_table, hammersley
from render.raster import RasterContext, texture
from render.texture_torch import PreparedCube, build_mip_chain, texture_torch
from render.util import (cube_texel_dirs, cube_texel_solid_angles, device_constant, dir_to_latlong_uv,
                         dot, latlong_dirs, reflect, safe_normalize)

TextureBackend = str | RasterContext   # "auto" | "torch" | "nvdiffrast" or a rasterizer context

# OpenCV reads this when it first decodes an EXR; it must be set before that happens.
os.environ.setdefault("OPENCV_IO_ENABLE_OPENEXR", "1")
import cv2  # noqa: E402

ENV_EXTENSIONS = (".hdr", ".exr")
DEFAULT_ENVMAP = Path(__file__).resolve().parent.parent / "data" / "envmaps" / "studio_sky.hdr"
MIN_ROUGHNESS = 0.08
MAX_ROUGHNESS = 0.5


class EnvMapError(ValueError):
    """An environment map file cannot be used (format, content)."""


class EnvMapNotFoundError(EnvMapError, FileNotFoundError):
    """The environment map file does not exist."""


# ----------------------------------------------------------------------------------------
# File I/O.

def read_hdr(path: str | os.PathLike) -> np.ndarray:
    """Read an .hdr / .exr lat-long map -> [H, W, 3] float32 linear RGB. Raises EnvMapError
    (EnvMapNotFoundError for a missing file) naming the path and the problem."""
    p = Path(path)
    if p.suffix.lower() not in ENV_EXTENSIONS:
        raise EnvMapError(f"environment map {p}: unsupported extension {p.suffix!r}; expected one of {ENV_EXTENSIONS}")
    if not p.is_file():
        raise EnvMapNotFoundError(f"environment map {p} does not exist (check the 'envmap' config key)")
    try:
        img = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    except cv2.error as e:
        img, err = None, str(e).strip()
    else:
        err = ""
    if img is None:
        hint = (" (this OpenCV build may lack OpenEXR support; convert the map to .hdr)"
                if p.suffix.lower() == ".exr" else "")
        raise EnvMapError(f"environment map {p} could not be decoded as {p.suffix} - file corrupt or truncated{hint}. {err}".strip())
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if img.ndim != 3 or img.shape[2] not in (3, 4) or not np.issubdtype(img.dtype, np.floating):
        raise EnvMapError(f"environment map {p}: expected a float RGB image, got shape {img.shape} dtype {img.dtype}")
    rgb = np.ascontiguousarray(img[:, :, 2::-1], dtype=np.float32)  # BGR(A) -> RGB
    if rgb.shape[0] < 2 or rgb.shape[1] < 4:
        raise EnvMapError(f"environment map {p}: {rgb.shape[1]}x{rgb.shape[0]} pixels is too small for a lat-long map")
    bad = int((~np.isfinite(rgb)).sum() + (rgb < 0).sum())
    if bad:
        raise EnvMapError(f"environment map {p}: {bad} non-finite or negative values; radiance must be finite and >= 0")
    return rgb


def check_envmap(path: str | os.PathLike) -> tuple[int, int]:
    """Validate an environment map without building any mips (for config --check).
    Returns (height, width)."""
    h, w, _ = read_hdr(path).shape
    return h, w


def write_hdr(path: str | os.PathLike, rgb: np.ndarray) -> None:
    """Write [H, W, 3] linear RGB as Radiance .hdr, atomically (temp file + rename)."""
    p = Path(path)
    if p.suffix.lower() != ".hdr":
        raise EnvMapError(f"cannot save light probe to {p}: only .hdr output is supported")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.", suffix=".hdr", dir=p.parent)
    os.close(fd)
    try:
        bgr = np.ascontiguousarray(rgb[:, :, ::-1], dtype=np.float32)
        if not cv2.imwrite(tmp, bgr):
            raise EnvMapError(f"OpenCV could not write {p}")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------
# Parameterization changes.

def sample_latlong(latlong: Tensor, dirs: Tensor) -> Tensor:
    """Bilinear lookup of a lat-long map [H, W, C] at unit directions [..., 3] -> [..., C].
    Wraps in longitude and clamps at the poles (one extra column on each side makes the
    longitude seam continuous under clamp addressing)."""
    h, w, c = latlong.shape
    padded = torch.cat([latlong[:, -1:], latlong, latlong[:, :1]], dim=1)[None]  # [1, H, W+2, C]
    uv = dir_to_latlong_uv(dirs.reshape(1, -1, 1, 3))
    uv = torch.stack([(uv[..., 0] * w + 1.0) / (w + 2), uv[..., 1]], dim=-1)
    out = texture_torch(padded, uv, filter_mode="linear", boundary_mode="clamp")
    return out.reshape(*dirs.shape[:-1], c)


def latlong_to_cubemap(latlong: Tensor, res: int) -> Tensor:
    """[H, W, 3] lat-long -> [6, res, res, 3] cube map. When the lat-long map is finer than
    the cube, each texel averages ss x ss sub-samples so that detail is filtered, not aliased."""
    ss = max(1, math.ceil(latlong.shape[1] / (4 * res)))
    fine = cube_texel_dirs(res * ss, device=latlong.device, dtype=latlong.dtype)  # [6, R*ss, R*ss, 3]
    vals = sample_latlong(latlong, fine)
    return vals.reshape(6, res, ss, res, ss, latlong.shape[-1]).mean(dim=(2, 4))


def cubemap_to_latlong(cube: Tensor, height: int, width: int | None = None) -> Tensor:
    """[6, R, R, C] cube map -> [height, width (2*height), C] lat-long map (bilinear)."""
    width = 2 * height if width is None else width
    dirs = latlong_dirs(height, width, device=cube.device, dtype=cube.dtype)
    out = texture_torch(cube[None], dirs[None], filter_mode="linear", boundary_mode="cube")
    return out[0]


# ----------------------------------------------------------------------------------------
# Prefiltering.

def ggx_ndf(n_dot_h: Tensor, alpha: float) -> Tensor:
    a2 = alpha * alpha
    return a2 / (math.pi * (n_dot_h * n_dot_h * (a2 - 1.0) + 1.0) ** 2)


def tangent_frame(n: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal (t, b) for unit normals [..., 3]."""
    up = torch.zeros_like(n)
    use_x = n[..., 2:3].abs() > 0.999
    up[..., 2:3] = (~use_x).to(n.dtype)
    up[..., 0:1] = use_x.to(n.dtype)
    t = safe_normalize(torch.cross(up, n, dim=-1))
    return t, torch.cross(n, t, dim=-1)


def specular_prefilter(chain: list[Tensor], out_res: int, roughness: float, samples: int,
                       chunk: int = 1 << 21) -> Tensor:
    """GGX-prefiltered radiance with N = V = R: out(n) = sum L(l) (n.l) / sum (n.l), l the
    reflection of n about GGX-sampled half vectors. chain: the box mip chain [6, R, R, 3]
    (finest first) used as the filtered source. Returns [6, out_res, out_res, 3]."""
    base = chain[0]
    alpha = roughness * roughness
    xi = torch.from_numpy(hammersley(samples)).to(device=base.device, dtype=base.dtype)
    cos_h = torch.sqrt((1.0 - xi[:, 0]) / (1.0 + (alpha * alpha - 1.0) * xi[:, 0]))
    sin_h = torch.sqrt((1.0 - cos_h * cos_h).clamp(min=0.0))
    phi = 2.0 * math.pi * xi[:, 1]
    h_local = torch.stack([sin_h * torch.cos(phi), sin_h * torch.sin(phi), cos_h], -1)  # [S, 3]
    n_dot_l = 2.0 * cos_h * cos_h - 1.0                                                  # [S]
    w = n_dot_l.clamp(min=0.0)
    # Filtered importance sampling: source level where a texel covers the sample's solid angle.
    pdf = ggx_ndf(cos_h, alpha) / 4.0
    omega_s = 1.0 / (samples * pdf.clamp(min=1e-12))
    omega_p = 4.0 * math.pi / (6.0 * base.shape[1] ** 2)
    lod = (0.5 * torch.log2(omega_s / omega_p) + 0.0).clamp(min=0.0)                     # [S]

    source = PreparedCube(chain)
    normals = cube_texel_dirs(out_res, device=base.device, dtype=base.dtype).reshape(-1, 3)
    keep = w > 0
    h_local, w, lod = h_local[keep], w[keep], lod[keep]
    per_chunk = max(1, chunk // max(1, h_local.shape[0]))
    outs = []
    for n in normals.split(per_chunk):
        t, b = tangent_frame(n)
        h = t[:, None] * h_local[None, :, 0:1] + b[:, None] * h_local[None, :, 1:2] + n[:, None] * h_local[None, :, 2:3]
        l = 2.0 * (h * n[:, None]).sum(-1, keepdim=True) * h - n[:, None]                  # [n, S, 3]
        radiance = source.sample(l.reshape(-1, 3), lod.expand(l.shape[0], -1).reshape(-1))
        radiance = radiance.reshape(l.shape[0], l.shape[1], -1)
        outs.append((radiance * w[None, :, None]).sum(1) / w.sum())
    return torch.cat(outs, 0).reshape(6, out_res, out_res, -1)


def diffuse_irradiance(cube: Tensor) -> Tensor:
    """Cosine convolution / pi of a (small) cube map [6, r, r, C] -> [6, r, r, C], exact
    quadrature over the source texels. Normalized by the quadrature of the cosine itself so
    that a constant environment is reproduced exactly."""
    r = cube.shape[1]
    dirs = cube_texel_dirs(r, device=cube.device, dtype=cube.dtype).reshape(-1, 3)
    d_omega = cube_texel_solid_angles(r, device=cube.device).to(cube.dtype).reshape(-1)
    cos = (dirs @ dirs.T).clamp(min=0.0) * d_omega[None, :]        # [out, src]
    out = (cos @ cube.reshape(-1, cube.shape[-1])) / cos.sum(1, keepdim=True)
    return out.reshape(cube.shape)


def lobe_spread(roughness: float, n: int = 4096) -> float:
    """E[1 - n.l] of the N = V = R prefilter kernel (GGX half vectors, weights n.l): how wide
    the lobe is. Midpoint quadrature over the inverse-CDF variable of the GGX sampling."""
    alpha2 = (roughness * roughness) ** 2
    u = (np.arange(n) + 0.5) / n
    cos2_h = (1.0 - u) / (1.0 + (alpha2 - 1.0) * u)
    n_dot_l = np.maximum(2.0 * cos2_h - 1.0, 0.0)
    return float(((1.0 - n_dot_l) * n_dot_l).sum() / n_dot_l.sum())


_SPREAD_ROUGHNESS = np.linspace(MAX_ROUGHNESS, 1.0, 65)
_SPREAD_VALUES = tuple(lobe_spread(float(r)) for r in _SPREAD_ROUGHNESS)


def _lobe_spread_table(roughness: Tensor) -> Tensor:
    """lobe_spread for roughness in [0.5, 1] by linear interpolation of a 65-entry table
    (differentiable in roughness)."""
    r = roughness.clamp(MAX_ROUGHNESS, 1.0)
    x = (r - MAX_ROUGHNESS) / (1.0 - MAX_ROUGHNESS) * (len(_SPREAD_ROUGHNESS) - 1)
    i0 = x.detach().floor().long().clamp(max=len(_SPREAD_ROUGHNESS) - 2)
    table = device_constant(_SPREAD_VALUES, roughness.dtype, roughness.device)
    return table[i0] + (table[i0 + 1] - table[i0]) * (x - i0.to(x.dtype))


def default_spec_samples(res: int) -> int:
    """Samples per texel for a prefiltered level of face size `res`: fewer where there are
    many texels (and the lobe is narrow), more for the small, rough levels."""
    return int(min(256, max(16, 8 * 512 // res)))


# ----------------------------------------------------------------------------------------
# The light.

class EnvironmentLight(nn.Module):
    """HDR environment light with split-sum shading. `base` [6, R, R, 3] linear radiance
    (already multiplied by env_scale)."""

    def __init__(self, base: Tensor, min_res: int = 16, trainable: bool = False) -> None:
        super().__init__()
        res = base.shape[1]
        if base.dim() != 4 or base.shape[0] != 6 or base.shape[2] != res or base.shape[3] != 3:
            raise EnvMapError(f"cube map base must have shape [6, R, R, 3], got {tuple(base.shape)}")
        # At least three levels: one at roughness 0.08, one at 0.5, one at 1.0.
        if min_res < 1 or res < 4 * min_res or res % min_res or (res // min_res) & (res // min_res - 1):
            raise EnvMapError(f"cube resolution {res} must be min_res ({min_res}) times a power of two >= 4")
        self.min_res = min_res
        self.base = nn.Parameter(base.clone(), requires_grad=trainable)
        self.specular: list[Tensor] = []
        self.diffuse: Tensor | None = None
        self._device_cache: dict[str, tuple[list[Tensor], Tensor]] = {}
        self.build_mips()

    # Construction ---------------------------------------------------------------------
    @classmethod
    def from_latlong(cls, hdr: Tensor, scale: float = 1.0, res: int = 512, min_res: int = 16,
                     trainable: bool = False) -> "EnvironmentLight":
        """hdr [H, W, 3] float linear radiance (lat-long, row 0 = up)."""
        if hdr.dim() != 3 or hdr.shape[-1] != 3 or not torch.is_floating_point(hdr):
            raise EnvMapError(f"lat-long map must be a float tensor [H, W, 3], got {tuple(hdr.shape)} {hdr.dtype}")
        if not (scale > 0 and math.isfinite(scale)):
            raise EnvMapError(f"env_scale must be a positive finite number, got {scale}")
        cube = latlong_to_cubemap(hdr.float() * scale, res)
        return cls(cube, min_res=min_res, trainable=trainable)

    @classmethod
    def load(cls, path: str | os.PathLike, scale: float = 1.0, res: int = 512, min_res: int = 16,
             device: torch.device | str = "cpu", trainable: bool = False) -> "EnvironmentLight":
        hdr = torch.from_numpy(read_hdr(path)).to(device)
        return cls.from_latlong(hdr, scale=scale, res=res, min_res=min_res, trainable=trainable)

    # Mips -----------------------------------------------------------------------------
    def build_mips(self) -> None:
        """(Re)compute the specular levels and the irradiance map from `base`. Call after
        every optimizer step when the light is trainable."""
        chain = [self.base] + build_mip_chain(self.base[None], cube=True)
        chain = [chain[0]] + [c[0] for c in chain[1:]]
        n_spec = int(math.log2(self.base.shape[1] // self.min_res)) + 1
        boxes = chain[:n_spec]
        spec = []
        for i, lvl in enumerate(boxes):
            r = lvl.shape[1]
            rough = 1.0 if i == n_spec - 1 else MIN_ROUGHNESS + (MAX_ROUGHNESS - MIN_ROUGHNESS) * i / (n_spec - 2)
            spec.append(specular_prefilter(chain, r, rough, default_spec_samples(r)))
        self.specular = spec
        self.diffuse = diffuse_irradiance(boxes[-1])
        self._device_cache = {}

    def get_mip(self, roughness: Tensor) -> Tensor:
        """Roughness -> fractional specular level. 0.08..0.5: linear over levels 0..n-2
        (nvdiffrec). 0.5..1: a blend of the last two levels whose weight matches the spread
        of the GGX lobe, E[1 - n.l], instead of nvdiffrec's weight linear in roughness;
        the linear weight is off by up to ~8% on smooth lobes at roughness 0.6..0.9."""
        n = len(self.specular)
        low = (roughness.clamp(MIN_ROUGHNESS, MAX_ROUGHNESS) - MIN_ROUGHNESS) / (MAX_ROUGHNESS - MIN_ROUGHNESS) * (n - 2)
        m_lo, m_hi = lobe_spread(MAX_ROUGHNESS), lobe_spread(1.0)
        tail = (_lobe_spread_table(roughness) - m_lo) / (m_hi - m_lo)
        high = tail.clamp(0.0, 1.0) + (n - 2)
        return torch.where(roughness < MAX_ROUGHNESS, low, high)

    def _maps(self, device: torch.device) -> tuple[list[Tensor], Tensor]:
        """Specular levels and irradiance on `device` (moved once and cached)."""
        assert self.diffuse is not None
        if self.specular[0].device == device:
            return self.specular, self.diffuse
        key = str(device)
        if key not in self._device_cache:
            self._device_cache[key] = ([s.to(device) for s in self.specular], self.diffuse.to(device))
        return self._device_cache[key]

    # Shading --------------------------------------------------------------------------
    def _specular_lookup(self, spec_maps: list[Tensor], dirs: Tensor, roughness: Tensor,
                         backend: TextureBackend) -> Tensor:
        lead = dirs.shape[:-1]
        level = self.get_mip(roughness).reshape(1, -1, 1)
        out = texture(spec_maps[0][None], dirs.reshape(1, -1, 1, 3), mip=[m[None] for m in spec_maps[1:]],
                      mip_level_bias=level, filter_mode="linear-mipmap-linear", boundary_mode="cube",
                      backend=backend)
        return out.reshape(*lead, 3)

    def prefiltered(self, dirs: Tensor, roughness: Tensor, backend: TextureBackend = "auto") -> Tensor:
        """Prefiltered radiance along unit reflection directions [..., 3] for roughness
        [..., 1] -> [..., 3] (the split-sum radiance factor)."""
        return self._specular_lookup(self._maps(dirs.device)[0], dirs, roughness, backend)

    def irradiance(self, normals: Tensor, backend: TextureBackend = "auto") -> Tensor:
        """Diffuse irradiance / pi along unit normals [..., 3] -> [..., 3]."""
        out = texture(self._maps(normals.device)[1][None], normals.reshape(1, -1, 1, 3),
                      filter_mode="linear", boundary_mode="cube", backend=backend)
        return out.reshape(*normals.shape[:-1], 3)

    def shade(self, gb_pos: Tensor, gb_normal: Tensor, kd: Tensor, ks: Tensor, view_pos: Tensor,
              specular: bool = True, backend: TextureBackend = "auto") -> Tensor:
        """Split-sum shading, linear RGB [..., 3].

        gb_pos, gb_normal (unit), kd: [..., 3]; ks [..., 3] = (occlusion, roughness,
        metallic); view_pos broadcastable to gb_pos (e.g. [B, 1, 1, 3]). ``backend``: the texture
        lookups' backend (render.raster.texture: nvdiffrast on CUDA for "auto", the PyTorch
        reference otherwise)."""
        lead = gb_pos.shape[:-1]
        for name, t in (("gb_normal", gb_normal), ("kd", kd), ("ks", ks)):
            if t.shape[:-1] != lead or t.shape[-1] != 3:
                raise ValueError(f"{name} must have shape {(*lead, 3)}, got {tuple(t.shape)}")
        spec_maps, diffuse_map = self._maps(gb_pos.device)
        flat = lambda x: x.reshape(1, -1, 1, x.shape[-1])  # noqa: E731  texture layout [1, N, 1, C]
        wo = safe_normalize(view_pos - gb_pos)
        occlusion, roughness, metallic = ks[..., 0:1], ks[..., 1:2], ks[..., 2:3]
        diff_col = kd * (1.0 - metallic) if specular else kd
        irradiance = texture(diffuse_map[None], flat(gb_normal), filter_mode="linear", boundary_mode="cube",
                             backend=backend)
        color = irradiance.reshape(*lead, 3) * diff_col
        if specular:
            spec_col = 0.04 * (1.0 - metallic) + kd * metallic
            n_dot_v = dot(wo, gb_normal).clamp(min=1e-4)
            fg = texture(fg_table(gb_pos.device), flat(torch.cat([n_dot_v, roughness], -1)),
                         filter_mode="linear", boundary_mode="clamp", backend=backend).reshape(*lead, 2)
            refl = safe_normalize(reflect(wo, gb_normal))
            prefiltered = self._specular_lookup(spec_maps, refl, roughness, backend)
            color = color + prefiltered * (spec_col * fg[..., 0:1] + fg[..., 1:2])
        return color * (1.0 - occlusion)

    # Export ---------------------------------------------------------------------------
    def to_latlong(self, res: int = 256) -> Tensor:
        """The (unfiltered) probe as a lat-long map [res, 2*res, 3]."""
        return cubemap_to_latlong(self.base.detach(), res)

    def save(self, path: str | os.PathLike, res: int | None = None) -> None:
        """Write the probe as a lat-long .hdr (height = cube resolution by default)."""
        latlong = self.to_latlong(res or self.base.shape[1])
        write_hdr(path, latlong.cpu().numpy())


def default_environment(scale: float = 1.0, res: int = 512, min_res: int = 16,
                        device: torch.device | str = "cpu") -> EnvironmentLight:
    """The project's soft studio sky (data/envmaps/studio_sky.hdr), used when a config
    names no envmap."""
    if not DEFAULT_ENVMAP.is_file():
        raise EnvMapNotFoundError(
            f"default environment {DEFAULT_ENVMAP} is missing; regenerate it with "
            f"`python scripts/make_default_env.py`")
    return EnvironmentLight.load(DEFAULT_ENVMAP, scale=scale, res=res, min_res=min_res, device=device)
