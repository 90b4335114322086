"""Small tensor helpers shared by the render and geometry code: input checks, colour transfer
functions, vector helpers, and the cube-map / lat-long parameterizations.

Conventions (identical to nvdiffrast's cube-map indexing, so maps are interchangeable):
- Cube faces in order +x, -x, +y, -y, +z, -z; a face is [H, W] with texel (row i, col j)
  centred at s = (j + 0.5) / W, t = (i + 0.5) / H.
- Lat-long maps are [H, W] with row 0 looking up (+y); u = atan2(x, -z) / (2 pi) + 0.5 runs
  along columns, v = acos(y) / pi along rows (the layout used by the published environment
  maps).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def triton_interpreter_active() -> bool:
    """TRITON_INTERPRET=1: Triton kernels run in Triton's interpreter (how CPU tests run them)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Equal devices, with cuda and cuda:0 the same."""
    return a.type == b.type and (a.type != "cuda" or (a.index or 0) == (b.index or 0))


def check_tensor(name: str, x: Any, dtype: torch.dtype | None, device: torch.device | None,
                 error: type[Exception] = ValueError) -> None:
    """Raise `error` naming `name` unless x is a Tensor of `dtype` on `device` (None: any)."""
    if not isinstance(x, Tensor):
        raise error(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if dtype is not None and x.dtype != dtype:
        hint = ".int()" if dtype == torch.int32 else ".float()"
        raise error(f"{name}: expected dtype {dtype}, got {x.dtype} (convert with {hint})")
    if device is not None and not same_device(x.device, device):
        raise error(f"{name}: expected device {device}, got {x.device}")

# Face id -> (axis of the major component, sign). Used by callers that need face normals.
CUBE_FACE_AXES: tuple[tuple[int, float], ...] = ((0, 1.0), (0, -1.0), (1, 1.0), (1, -1.0), (2, 1.0), (2, -1.0))


# ----------------------------------------------------------------------------------------
# Device constants.

@functools.lru_cache(maxsize=64)
def device_constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A constant vector [len(values)] on `device`, copied there once and cached.

    A tensor built from host values on every call costs a pageable host-to-device copy, which
    synchronizes the stream: in a training step's hot path that stalls the host each time.
    Callers must not modify the result in place (it is shared).
    """
    return torch.tensor(values, dtype=dtype, device=device)


def gather_rows(x: Tensor, idx: Tensor) -> Tensor:
    """x[idx] for a 1-D index: the same values either way. On CUDA through index_select, whose
    backward is an atomic index_add, instead of the sort-based index_put of indexing (slower, only
    needed for determinism); on CPU by indexing, as the reference path does."""
    return x.index_select(0, idx) if x.is_cuda else x[idx]


# ----------------------------------------------------------------------------------------
# Resampling.

@functools.lru_cache(maxsize=16)
def _aa_bilinear_weights(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """[n_in, n_out]: column i holds the weights of output sample i along one axis of PyTorch's
    antialiased bilinear resize (align_corners=False), read off by resizing the identity, so they
    are PyTorch's own (filter, support and border renormalization included). Cached; read-only."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]                          # [1, 1, n_in, n_in]
    w = F.interpolate(eye, (n_in, n_out), mode="bilinear", align_corners=False, antialias=True)[0, 0]
    return w.to(dtype=dtype, device=device)


def resize_bilinear_aa(img_bxhxwxc: Tensor, size: tuple[int, int]) -> Tensor:
    """[B, H, W, C] -> [B, C, h, w], equal (to rounding) to
    ``F.interpolate(img.permute(0, 3, 1, 2), size, mode="bilinear", align_corners=False, antialias=True)``.

    The filter is separable, so the resize is two matrix products with the per-axis weights
    (out = Wh^T @ x @ Ww). Their backward is two more products; PyTorch's antialiased kernel
    scatters its backward with atomics, which made it the slowest op after the rasterizer in the
    coarse geometry step (0.18 ms of it on an H200 at 4 x 512^2 -> 64^2).
    """
    if img_bxhxwxc.dim() != 4 or not img_bxhxwxc.is_floating_point():
        raise ValueError(f"img_bxhxwxc: expected a floating-point [B, H, W, C] tensor, got "
                         f"{tuple(img_bxhxwxc.shape)} {img_bxhxwxc.dtype}")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"size: expected (h, w) with h, w >= 1, got {tuple(size)}")
    _, h_in, w_in, _ = img_bxhxwxc.shape
    dt, dev = img_bxhxwxc.dtype, img_bxhxwxc.device
    weights_h = _aa_bilinear_weights(h_in, int(size[0]), dt, dev)                   # [H, h]
    weights_w = _aa_bilinear_weights(w_in, int(size[1]), dt, dev)                   # [W, w]
    rows = torch.matmul(img_bxhxwxc.permute(0, 3, 1, 2), weights_w)                 # [B, C, H, w]
    return torch.matmul(weights_h.t(), rows)                                        # [B, C, h, w]


# ----------------------------------------------------------------------------------------
# Colour.

def srgb_to_linear(srgb: Tensor) -> Tensor:
    """IEC 61966-2-1 decoding; input clamped to [0, 1] first (sRGB is only defined there)."""
    x = srgb.clamp(0.0, 1.0)
    return torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(linear: Tensor) -> Tensor:
    """IEC 61966-2-1 encoding. The power branch clamps its argument so that the unused branch
    of `where` cannot produce NaN gradients for tiny/negative inputs."""
    x = linear.clamp(min=0.0)
    return torch.where(x <= 0.0031308, x * 12.92, 1.055 * x.clamp(min=0.0031308) ** (1.0 / 2.4) - 0.055)


# ----------------------------------------------------------------------------------------
# Vectors ([..., 3] unless stated).

def dot(a: Tensor, b: Tensor) -> Tensor:
    """[..., C] x [..., C] -> [..., 1]."""
    return (a * b).sum(dim=-1, keepdim=True)


def length(x: Tensor, eps: float = 1e-20) -> Tensor:
    return torch.sqrt(dot(x, x).clamp(min=eps))


def safe_normalize(x: Tensor, eps: float = 1e-20) -> Tensor:
    """Normalize without dividing by zero: zero vectors stay (numerically) zero and their
    gradient stays finite."""
    return x / length(x, eps)


def reflect(x: Tensor, n: Tensor) -> Tensor:
    """Mirror `x` about the unit normal `n` (both pointing away from the surface)."""
    return 2.0 * dot(x, n) * n - x


# ----------------------------------------------------------------------------------------
# Cube maps.

def cube_to_dir(face: Tensor, s: Tensor, t: Tensor) -> Tensor:
    """Face id [...] (int) and face coordinates s, t [...] (0..1, may lie outside) ->
    unnormalized direction [..., 3]. Inverse of `dir_to_cube` (nvdiffrast orientation)."""
    sc = 2.0 * s - 1.0
    tc = 2.0 * t - 1.0
    one = torch.ones_like(sc)
    # Per face (x, y, z) as functions of (sc, tc); rows follow the face order.
    cand = torch.stack([
        torch.stack([one, -tc, -sc], -1),
        torch.stack([-one, -tc, sc], -1),
        torch.stack([sc, one, tc], -1),
        torch.stack([sc, -one, -tc], -1),
        torch.stack([sc, -tc, one], -1),
        torch.stack([-sc, -tc, -one], -1),
    ], 0)  # [6, ..., 3]
    idx = face.long().clamp(0, 5)
    return torch.gather(cand, 0, idx[None, ..., None].expand(1, *idx.shape, 3))[0]


def cube_face_masks(d: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Face selection of directions [..., 3] -> (is_z, is_y, negative) bool masks [...].

    Tie breaking follows nvdiffrast: z wins only when strictly largest, then y when strictly
    larger than x, else x."""
    x, y, z = d.unbind(-1)
    ax, ay, az = x.abs(), y.abs(), z.abs()
    is_z = az > torch.maximum(ax, ay)
    is_y = (~is_z) & (ay > ax)
    c = torch.where(is_z, z, torch.where(is_y, y, x))
    return is_z, is_y, c < 0


def cube_components(v: Tensor, is_z: Tensor, is_y: Tensor, neg: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Given face masks, pick (major component c, s numerator, t numerator) from v [..., 3] so
    that s = 0.5 + s_num / (2 |c|) and t = 0.5 + t_num / (2 |c|). Linear in v, so applying it
    to a derivative dv/dX gives the derivative of the numerators."""
    x, y, z = v.unbind(-1)
    c = torch.where(is_z, z, torch.where(is_y, y, x))
    s_num = torch.where(is_z, torch.where(neg, -x, x), torch.where(is_y, x, torch.where(neg, z, -z)))
    t_num = torch.where(is_z, -y, torch.where(is_y, torch.where(neg, -z, z), -y))
    return c, s_num, t_num


def dir_to_cube(d: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Direction [..., 3] -> (face [...] int64, s [...], t [...], valid [...] bool).

    Face order and orientation follow nvdiffrast; s, t are clamped to [0, 1]. Invalid
    directions (zero or non-finite) return valid=False with s = t = 0.5."""
    is_z, is_y, neg = cube_face_masks(d)
    face = torch.where(is_z, 4, torch.where(is_y, 2, 0)) + neg.long()
    c, s_num, t_num = cube_components(d, is_z, is_y, neg)
    ac = c.abs()
    valid = (ac > 0) & torch.isfinite(d).all(dim=-1)
    inv = 0.5 / torch.where(valid, ac, torch.ones_like(ac))
    s = torch.where(valid, (s_num * inv + 0.5).clamp(0.0, 1.0), torch.full_like(ac, 0.5))
    t = torch.where(valid, (t_num * inv + 0.5).clamp(0.0, 1.0), torch.full_like(ac, 0.5))
    return face, s, t, valid


def cube_texel_dirs(res: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit directions through the texel centres of a res^2 cube map: [6, res, res, 3]."""
    c = (torch.arange(res, device=device, dtype=dtype) + 0.5) / res
    t, s = torch.meshgrid(c, c, indexing="ij")  # rows follow t, columns follow s
    face = torch.arange(6, device=device)[:, None, None].expand(6, res, res)
    return safe_normalize(cube_to_dir(face, s.expand(6, res, res), t.expand(6, res, res)))


def cube_texel_solid_angles(res: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float64) -> Tensor:
    """Exact solid angle of every texel of a res^2 cube map: [6, res, res]. Sums to 4 pi.

    Uses the closed form of the area of a rectangle [x0,x1]x[y0,y1] on the z = 1 plane
    projected on the unit sphere: F(x, y) = atan2(x y, sqrt(x^2 + y^2 + 1))."""
    e = torch.linspace(-1.0, 1.0, res + 1, device=device, dtype=dtype)

    def area(x: Tensor, y: Tensor) -> Tensor:
        return torch.atan2(x * y, torch.sqrt(x * x + y * y + 1.0))

    y0, x0 = torch.meshgrid(e[:-1], e[:-1], indexing="ij")
    y1, x1 = torch.meshgrid(e[1:], e[1:], indexing="ij")
    w = area(x1, y1) - area(x0, y1) - area(x1, y0) + area(x0, y0)
    return w.expand(6, res, res).contiguous()


# ----------------------------------------------------------------------------------------
# Lat-long maps.

def latlong_dirs(height: int, width: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """Unit directions through the pixel centres of a lat-long map: [H, W, 3]."""
    v = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    u = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    theta = v[:, None] * math.pi  # polar angle from +y
    phi = (u[None, :] - 0.5) * 2.0 * math.pi
    sin_t = torch.sin(theta)
    x = sin_t * torch.sin(phi)
    z = -sin_t * torch.cos(phi)
    y = torch.cos(theta).expand_as(x)
    return torch.stack([x, y, z], dim=-1)


def dir_to_latlong_uv(d: Tensor) -> Tensor:
    """Unit direction [..., 3] -> lat-long texture coordinates (u, v) in [0, 1]: [..., 2]."""
    x, y, z = d.unbind(-1)
    u = torch.atan2(x, -z) / (2.0 * math.pi) + 0.5
    v = torch.acos(y.clamp(-1.0, 1.0)) / math.pi
    return torch.stack([u, v], dim=-1)
