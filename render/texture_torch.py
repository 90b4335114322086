"""Pure-PyTorch texture sampling with nvdiffrast's `texture()` semantics (CPU and CUDA).

Semantics reproduced from nvdiffrast (documentation and kernel behaviour):
- 2D textures tex [B, H, W, C], uv [B, h, w, 2]; u runs along W, v along H, texel (i, j)
  centred at ((j + 0.5) / W, (i + 0.5) / H). Boundary modes:
  wrap (fractional part of uv), clamp (to the centres of the edge texels), zero (texture is
  virtually extended with zeros).
- Cube maps tex [B, 6, R, R, C] with boundary_mode="cube", uv = directions [B, h, w, 3];
  faces +x, -x, +y, -y, +z, -z (see render/util.py for the orientation). Bilinear filtering
  reads across face edges; at a cube corner the missing fourth texel is the average of the
  other three. Invalid directions (zero / non-finite) give zeros.
- Filters: nearest, linear, linear-mipmap-nearest, linear-mipmap-linear; "auto" picks
  linear-mipmap-linear when uv_da or mip_level_bias is given, else linear.
- Mip level = 0.5 * log2(major footprint axis^2 in texels) from uv_da (if given) plus
  mip_level_bias, clamped to [0, max level]. Mip chains are built by 2x2 box filtering
  (extent-1 axes averaged pairwise) until 1x1 or `max_mip_level`; a custom chain can be
  given in `mip` (coarser levels only; gradients then go to those tensors, not to `tex`).
- The minibatch axis of `tex` broadcasts when it is 1.

Implementation: every level that a call needs is flattened into one [M, C] buffer (cube
faces are first padded with a one-texel border copied from the neighbouring faces, so the
bilinear footprint never needs wrapping logic), and all lookups become four gathers per
level. Gradients w.r.t. tex, uv, uv_da and mip_level_bias come from autograd.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from render.util import cube_components, cube_face_masks, cube_to_dir, dir_to_cube

FILTER_MODES = ("auto", "nearest", "linear", "linear-mipmap-nearest", "linear-mipmap-linear")
BOUNDARY_MODES = ("wrap", "clamp", "zero", "cube")


class TextureError(ValueError):
    """Invalid arguments to texture_torch (shapes, modes, mip chains)."""


# ----------------------------------------------------------------------------------------
# Argument checks.

def _check_args(tex: Tensor, uv: Tensor, uv_da: Tensor | None, mip_level_bias: Tensor | None,
                filter_mode: str, boundary_mode: str) -> None:
    if filter_mode not in FILTER_MODES:
        raise TextureError(f"filter_mode must be one of {FILTER_MODES}, got {filter_mode!r}")
    if boundary_mode not in BOUNDARY_MODES:
        raise TextureError(f"boundary_mode must be one of {BOUNDARY_MODES}, got {boundary_mode!r}")
    if not torch.is_floating_point(tex):
        raise TextureError(f"tex must be a floating-point tensor, got dtype {tex.dtype}")
    cube = boundary_mode == "cube"
    want_tex, want_uv = (5, 3) if cube else (4, 2)
    if tex.dim() != want_tex or (cube and (tex.shape[1] != 6 or tex.shape[2] != tex.shape[3])):
        shape = "[B, 6, R, R, C]" if cube else "[B, H, W, C]"
        raise TextureError(f"tex must have shape {shape} for boundary_mode={boundary_mode!r}, got {tuple(tex.shape)}")
    if uv.dim() != 4 or uv.shape[-1] != want_uv:
        raise TextureError(f"uv must have shape [B, h, w, {want_uv}] for boundary_mode={boundary_mode!r}, got {tuple(uv.shape)}")
    if tex.shape[0] not in (1, uv.shape[0]):
        raise TextureError(f"tex minibatch {tex.shape[0]} must be 1 or equal to the uv minibatch {uv.shape[0]}")
    if uv_da is not None and tuple(uv_da.shape) != (*uv.shape[:-1], 2 * want_uv):
        raise TextureError(f"uv_da must have shape {(*uv.shape[:-1], 2 * want_uv)}, got {tuple(uv_da.shape)}")
    if mip_level_bias is not None and tuple(mip_level_bias.shape) != tuple(uv.shape[:-1]):
        raise TextureError(f"mip_level_bias must have shape {tuple(uv.shape[:-1])}, got {tuple(mip_level_bias.shape)}")
    for name, t in (("uv", uv), ("uv_da", uv_da), ("mip_level_bias", mip_level_bias)):
        if t is not None and t.device != tex.device:
            raise TextureError(f"{name} is on {t.device} but tex is on {tex.device}; move both to one device")


# ----------------------------------------------------------------------------------------
# Mip chains.

def _spatial(t: Tensor, cube: bool) -> tuple[int, int]:
    return (t.shape[2], t.shape[3]) if cube else (t.shape[1], t.shape[2])


def _downsample(level: Tensor, cube: bool) -> Tensor:
    """2x2 box filter of one level ([B, H, W, C] or [B, 6, R, R, C]); extent-1 axes stay 1."""
    h, w = _spatial(level, cube)
    if (h > 1 and h % 2) or (w > 1 and w % 2):
        raise TextureError(
            f"cannot build a mip chain: odd extent {h}x{w} greater than 1; resize the texture to "
            f"power-of-two extents or limit max_mip_level")
    lead = level.shape[:-3]
    c = level.shape[-1]
    h2, w2 = max(h // 2, 1), max(w // 2, 1)
    fh, fw = h // h2, w // w2
    return level.reshape(*lead, h2, fh, w2, fw, c).mean(dim=(-4, -2))


def build_mip_chain(tex: Tensor, cube: bool = False, max_mip_level: int | None = None) -> list[Tensor]:
    """Coarser levels of `tex` by 2x2 box filtering, down to 1x1 or `max_mip_level` levels."""
    levels: list[Tensor] = []
    cur = tex
    while max(_spatial(cur, cube)) > 1 and (max_mip_level is None or len(levels) < max_mip_level):
        cur = _downsample(cur, cube)
        levels.append(cur)
    return levels


def _check_custom_mips(tex: Tensor, mip: list[Tensor], cube: bool) -> None:
    h, w = _spatial(tex, cube)
    for i, m in enumerate(mip, start=1):
        want = (tex.shape[0], 6, max(h >> i, 1), max(w >> i, 1), tex.shape[-1]) if cube else \
               (tex.shape[0], max(h >> i, 1), max(w >> i, 1), tex.shape[-1])
        if not isinstance(m, Tensor) or tuple(m.shape) != want:
            got = tuple(m.shape) if isinstance(m, Tensor) else type(m).__name__
            raise TextureError(f"mip[{i - 1}] (level {i}) must have shape {want}, got {got}")
        if m.device != tex.device:
            raise TextureError(f"mip[{i - 1}] is on {m.device} but tex is on {tex.device}")


# ----------------------------------------------------------------------------------------
# Cube face padding: each face gets a one-texel border taken from its neighbours.

_PAD_CACHE: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]] = {}


def _cube_pad_maps(res: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Index maps that turn faces [6*R*R] into padded faces [6*P*P], P = R + 2.

    Returns (src [6*P*P] source texel per padded texel, corner_pos [24] padded positions of
    the face corners, corner_src [24, 3] the three texels whose average fills a corner).
    A border texel's source is found by pushing its centre direction (which lies just past
    the face edge) back through the face selection, so orientation comes for free."""
    key = (res, str(device))
    if key in _PAD_CACHE:
        return _PAD_CACHE[key]
    p = res + 2
    f, i, j = torch.meshgrid(torch.arange(6), torch.arange(p), torch.arange(p), indexing="ij")
    s = (j.double() - 0.5) / res  # texel (j - 1) centre
    t = (i.double() - 0.5) / res
    face2, s2, t2, _ = dir_to_cube(cube_to_dir(f, s, t))
    iu = (s2 * res).floor().long().clamp(0, res - 1)
    iv = (t2 * res).floor().long().clamp(0, res - 1)
    src = face2 * res * res + iv * res + iu  # [6, P, P]
    corner_pos, corner_src = [], []
    for face in range(6):
        for ci, ni in ((0, 1), (p - 1, p - 2)):
            for cj, nj in ((0, 1), (p - 1, p - 2)):
                corner_pos.append((face * p + ci) * p + cj)
                corner_src.append([src[face, ci, nj], src[face, ni, cj], src[face, ni, nj]])
    maps = (src.reshape(-1).to(device), torch.tensor(corner_pos, device=device),
            torch.tensor(corner_src, device=device))
    _PAD_CACHE[key] = maps
    return maps


def pad_cube(level: Tensor) -> Tensor:
    """[B, 6, R, R, C] -> [B, 6, R+2, R+2, C] with borders from the adjacent faces and the
    corners set to the average of their three neighbours (nvdiffrast's corner rule)."""
    b, _, r, _, c = level.shape
    src, corner_pos, corner_src = _cube_pad_maps(r, level.device)
    flat = level.reshape(b, 6 * r * r, c)
    padded = flat.index_select(1, src)
    corners = flat.index_select(1, corner_src.reshape(-1)).reshape(b, -1, 3, c).mean(dim=2)
    padded = padded.index_copy(1, corner_pos, corners)
    return padded.reshape(b, 6, r + 2, r + 2, c)


# ----------------------------------------------------------------------------------------
# Flattened level buffer and texel fetches.

@dataclass
class _Levels:
    flat: Tensor      # [M, C] all levels (cube levels padded)
    offset: Tensor    # [L] int64 start of each level in flat
    height: Tensor    # [L] int64 unpadded extents
    width: Tensor     # [L] int64
    batch: int        # texture minibatch size
    cube: bool


def _make_levels(levels: list[Tensor], cube: bool) -> _Levels:
    flats, offsets, heights, widths = [], [], [], []
    total = 0
    for lvl in levels:
        h, w = _spatial(lvl, cube)
        data = pad_cube(lvl) if cube else lvl
        f = data.reshape(-1, lvl.shape[-1])
        flats.append(f)
        offsets.append(total)
        heights.append(h)
        widths.append(w)
        total += f.shape[0]
    dev = levels[0].device
    as_t = lambda x: torch.tensor(x, dtype=torch.long, device=dev)  # noqa: E731
    flat = flats[0] if len(flats) == 1 else torch.cat(flats, 0)
    return _Levels(flat, as_t(offsets), as_t(heights), as_t(widths), levels[0].shape[0], cube)


def _address(lv: _Levels, lvl: Tensor, b: Tensor, face: Tensor | None, iu: Tensor, iv: Tensor) -> Tensor:
    """Row in lv.flat of texel (iu, iv) (already in range; -1..R for padded cube faces)."""
    h, w = lv.height[lvl], lv.width[lvl]
    if lv.cube:
        p = w + 2
        return lv.offset[lvl] + ((b * 6 + face) * p + iv + 1) * p + iu + 1
    return lv.offset[lvl] + (b * h + iv) * w + iu


def _nearest_taps(lv: _Levels, lvl: Tensor, b: Tensor, face: Tensor | None, s: Tensor, t: Tensor,
                  boundary: str) -> tuple[Tensor, Tensor]:
    """Address [N, 1] and weight [N, 1] of the nearest texel."""
    h, w = lv.height[lvl], lv.width[lvl]
    if boundary == "wrap":
        s, t = s - s.floor(), t - t.floor()
    iu = (s * w).floor().long()
    iv = (t * h).floor().long()
    inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
    iu = torch.minimum(iu.clamp(min=0), w - 1)
    iv = torch.minimum(iv.clamp(min=0), h - 1)
    weight = inside.to(s.dtype) if boundary == "zero" else torch.ones_like(s)
    return _address(lv, lvl, b, face, iu, iv)[:, None], weight[:, None]


def _bilinear_taps(lv: _Levels, lvl: Tensor, b: Tensor, face: Tensor | None, s: Tensor, t: Tensor,
                   boundary: str) -> tuple[Tensor, Tensor]:
    """Addresses [N, 4] and bilinear weights [N, 4] (order 00, 10, 01, 11) at level `lvl` [N].
    Weights carry the uv gradient; taps outside the texture in 'zero' mode get weight 0."""
    h, w = lv.height[lvl], lv.width[lvl]
    if boundary == "wrap":
        s, t = s - s.floor(), t - t.floor()
    x = s * w - 0.5
    y = t * h - 0.5
    if boundary == "clamp":
        # Clamping the coordinate (not only the index) zeroes the uv gradient outside, as nvdiffrast.
        x = torch.minimum(x.clamp(min=0.0), (w - 1).to(x.dtype))
        y = torch.minimum(y.clamp(min=0.0), (h - 1).to(y.dtype))
    x0f, y0f = x.floor(), y.floor()
    fx, fy = x - x0f, y - y0f
    weights = torch.stack([(1 - fx) * (1 - fy), fx * (1 - fy), (1 - fx) * fy, fx * fy], dim=1)
    x0, y0 = x0f.long(), y0f.long()
    if lv.cube:
        # x, y lie in [-0.5, R - 0.5]: the quad stays inside the padded face, no wrapping.
        a00 = _address(lv, lvl, b, face, x0, y0)
        p = w + 2
        return torch.stack([a00, a00 + 1, a00 + p, a00 + p + 1], dim=1), weights
    x1, y1 = x0 + 1, y0 + 1
    if boundary == "wrap":
        x0, x1, y0, y1 = x0.remainder(w), x1.remainder(w), y0.remainder(h), y1.remainder(h)
    elif boundary == "clamp":
        x1, y1 = torch.minimum(x1, w - 1), torch.minimum(y1, h - 1)
    elif boundary == "zero":
        okx0, okx1 = (x0 >= 0) & (x0 < w), (x1 >= 0) & (x1 < w)
        oky0, oky1 = (y0 >= 0) & (y0 < h), (y1 >= 0) & (y1 < h)
        ok = torch.stack([okx0 & oky0, okx1 & oky0, okx0 & oky1, okx1 & oky1], dim=1)
        weights = weights * ok.to(weights.dtype)
        zero = torch.zeros_like(w)
        x0, x1 = torch.minimum(torch.maximum(x0, zero), w - 1), torch.minimum(torch.maximum(x1, zero), w - 1)
        y0, y1 = torch.minimum(torch.maximum(y0, zero), h - 1), torch.minimum(torch.maximum(y1, zero), h - 1)
    row0, row1 = (b * h + y0) * w, (b * h + y1) * w
    off = lv.offset[lvl]
    return torch.stack([row0 + x0, row0 + x1, row1 + x0, row1 + x1], dim=1) + off[:, None], weights


def _gather(lv: _Levels, addr: Tensor, weights: Tensor) -> Tensor:
    """Weighted sum of texels: addr, weights [N, K] -> [N, C]."""
    taps = lv.flat.index_select(0, addr.reshape(-1)).reshape(*addr.shape, lv.flat.shape[-1])
    return (taps * weights.unsqueeze(-1).to(taps.dtype)).sum(dim=1)


# ----------------------------------------------------------------------------------------
# Mip level selection.

def _footprint_level(dsdx: Tensor, dsdy: Tensor, dtdx: Tensor, dtdy: Tensor) -> Tensor:
    """0.5 * log2 of the squared major axis of the pixel footprint (texel units)."""
    a = dsdx * dsdx + dtdx * dtdx
    b = dsdy * dsdy + dtdy * dtdy
    c = dsdx * dsdy + dtdx * dtdy
    l2b = 0.5 * (a + b)
    l2a = torch.sqrt((0.25 * (a - b) ** 2 + c * c).clamp(min=1e-30))
    # Tiny floor instead of log2(0) = -inf: the level is clamped at 0 anyway and the
    # gradient stays finite.
    return 0.5 * torch.log2((l2b + l2a).clamp(min=1e-30))


def _level_from_uv_da(uv: Tensor, uv_da: Tensor, h0: int, w0: int, cube: bool) -> Tensor:
    """uv [N, 2|3], uv_da [N, 4|6] -> fractional mip level [N] (before bias and clamping)."""
    if not cube:
        return _footprint_level(uv_da[:, 0] * w0, uv_da[:, 1] * w0, uv_da[:, 2] * h0, uv_da[:, 3] * h0)
    dvdx = uv_da[:, 0::2]  # d{x,y,z}/dX
    dvdy = uv_da[:, 1::2]  # d{x,y,z}/dY
    masks = cube_face_masks(uv)
    c, s_num, t_num = cube_components(uv, *masks)
    sign = torch.where(c < 0, -1.0, 1.0).to(uv.dtype)
    a = c.abs().clamp(min=1e-30)

    def d_face(dv: Tensor) -> tuple[Tensor, Tensor]:
        dc, ds_num, dt_num = cube_components(dv, *masks)
        da = sign * dc
        # s = 0.5 + s_num / (2a)  =>  ds = (ds_num * a - s_num * da) / (2 a^2)
        return (ds_num * a - s_num * da) / (2 * a * a), (dt_num * a - t_num * da) / (2 * a * a)

    dsdx, dtdx = d_face(dvdx)
    dsdy, dtdy = d_face(dvdy)
    return _footprint_level(dsdx * w0, dsdy * w0, dtdx * h0, dtdy * h0)


# ----------------------------------------------------------------------------------------
# Lookups on prepared levels.

def _lookup(lv: _Levels, uv_n: Tensor, flevel: Tensor | None, filter_mode: str, boundary_mode: str,
            bsz: int) -> Tensor:
    """uv_n [N, 2|3] (N = bsz * pixels, minibatch-major), flevel [N] (mip modes) -> [N, C]."""
    n = uv_n.shape[0]
    dev = uv_n.device
    b = torch.arange(bsz, device=dev).repeat_interleave(n // bsz) if lv.batch > 1 \
        else torch.zeros(n, dtype=torch.long, device=dev)
    if lv.cube:
        face, s, t, valid = dir_to_cube(uv_n)
    else:
        face, valid = None, None
        s, t = uv_n[:, 0], uv_n[:, 1]
    max_level = lv.offset.shape[0] - 1
    lvl0 = torch.zeros(n, dtype=torch.long, device=dev)
    if filter_mode == "nearest":
        addr, weights = _nearest_taps(lv, lvl0, b, face, s, t, boundary_mode)
    elif flevel is None or max_level == 0:
        addr, weights = _bilinear_taps(lv, lvl0, b, face, s, t, boundary_mode)
    else:
        flevel = flevel.clamp(0.0, float(max_level))
        level0 = flevel.detach().floor().long()
        addr, weights = _bilinear_taps(lv, level0, b, face, s, t, boundary_mode)
        if filter_mode == "linear-mipmap-linear":
            # Both levels in one gather: 8 taps, the second four weighted by the level fraction.
            level1 = (level0 + 1).clamp(max=max_level)
            frac = (flevel - level0.to(flevel.dtype))[:, None]
            addr1, weights1 = _bilinear_taps(lv, level1, b, face, s, t, boundary_mode)
            addr = torch.cat([addr, addr1], dim=1)
            weights = torch.cat([weights * (1 - frac), weights1 * frac], dim=1)
    out = _gather(lv, addr, weights)
    if valid is not None:
        out = out * valid[:, None].to(out.dtype)
    return out


class PreparedCube:
    """A cube map and its coarser levels, padded and flattened once for many lookups (e.g.
    the light prefilter, which samples the same chain millions of times).
    levels: [6, R, R, C], [6, R/2, R/2, C], ... (finest first, minibatch of 1)."""

    def __init__(self, levels: list[Tensor]) -> None:
        batched = [lvl[None] for lvl in levels]
        if batched[0].dim() != 5 or batched[0].shape[1] != 6:
            raise TextureError(f"cube levels must be [6, R, R, C], got {tuple(levels[0].shape)}")
        _check_custom_mips(batched[0], batched[1:], cube=True)
        self._lv = _make_levels(batched, cube=True)

    def sample(self, dirs: Tensor, level: Tensor | None = None) -> Tensor:
        """dirs [N, 3], level [N] fractional (None: finest, bilinear) -> [N, C]; filtering as
        texture_torch 'linear-mipmap-linear' with boundary_mode='cube'."""
        return _lookup(self._lv, dirs, level, "linear-mipmap-linear", "cube", 1)


# ----------------------------------------------------------------------------------------
# Entry point.

def texture_torch(tex: Tensor, uv: Tensor, uv_da: Tensor | None = None, mip_level_bias: Tensor | None = None,
                  mip: list[Tensor] | None = None, filter_mode: str = "auto", boundary_mode: str = "wrap",
                  max_mip_level: int | None = None) -> Tensor:
    """Sample `tex` at `uv`; returns [B, h, w, C]. See the module docstring for semantics."""
    _check_args(tex, uv, uv_da, mip_level_bias, filter_mode, boundary_mode)
    if filter_mode == "auto":
        filter_mode = "linear-mipmap-linear" if (uv_da is not None or mip_level_bias is not None) else "linear"
    if max_mip_level is not None and max_mip_level < 0:
        raise TextureError(f"max_mip_level must be >= 0 or None, got {max_mip_level}")
    mipmapped = "mipmap" in filter_mode
    if mipmapped and uv_da is None and mip_level_bias is None:
        raise TextureError(f"filter_mode={filter_mode!r} needs uv_da or mip_level_bias")
    if mipmapped and max_mip_level == 0:
        filter_mode, mipmapped = "linear", False
    if mip is not None and not isinstance(mip, (list, tuple)):
        raise TextureError(f"mip must be a list of tensors (coarser levels), got {type(mip).__name__}")
    cube = boundary_mode == "cube"

    levels = [tex]
    if mipmapped:
        if mip is not None:
            _check_custom_mips(tex, list(mip), cube)
            levels += list(mip)[:max_mip_level] if max_mip_level is not None else list(mip)
        else:
            levels += build_mip_chain(tex, cube, max_mip_level)
    lv = _make_levels(levels, cube)

    bsz, hh, ww, _ = uv.shape
    n = bsz * hh * ww
    uv_n = uv.reshape(n, uv.shape[-1])
    flevel = None
    if mipmapped:
        h0, w0 = _spatial(tex, cube)
        flevel = torch.zeros(n, dtype=uv.dtype, device=uv.device)
        if uv_da is not None:
            flevel = _level_from_uv_da(uv_n, uv_da.reshape(n, -1), h0, w0, cube)
        if mip_level_bias is not None:
            flevel = flevel + mip_level_bias.reshape(n).to(uv.dtype)
    out = _lookup(lv, uv_n, flevel, filter_mode, boundary_mode, bsz)
    return out.reshape(bsz, hh, ww, tex.shape[-1])
