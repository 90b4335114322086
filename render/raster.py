"""The one import point for rasterization: nvdiffrast on CUDA, pure PyTorch elsewhere.

Both backends follow nvdiffrast's signatures and semantics:
- `pos` clip space float32 `[B, V, 4]` (instanced) or `[V, 4]` with `ranges [B, 2]` int32 on CPU.
- `tri [F, 3]` int32.
- `rast [B, H, W, 4]` = (u, v, z/w, triangle_id + 1; 0 = empty); u, v are the barycentrics of the
  triangle's vertex 0 and 1. Pixel (x, y) samples NDC ((x+0.5)/W*2-1, (y+0.5)/H*2-1); image row 0
  is NDC y = -1.
- `rast_db [B, H, W, 4]` = (du/dX, du/dY, dv/dX, dv/dY) per pixel.

Antialiasing has two methods on either backend: "walk" (render/silhouette.py: each pixel pair's
segment is followed over the mesh to the silhouette edge, which keeps the silhouette gradient
where triangles are smaller than a pixel or two) and "pixel" (nvdiffrast's own antialias, or its
PyTorch copy: only the triangle under the nearer pixel is tested).

nvdiffrast is optional: CPU-only installs work without it. Its import error is kept, and a CUDA
context is only created when one is requested.
"""

from __future__ import annotations

import functools
import logging
import sys
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import Tensor

from render import raster_torch, silhouette
from render.silhouette import SilhouetteTopology
from render.texture_torch import texture_torch
from render.util import check_tensor

# nvdiffrast, the CUDA rasterizer, is optional (CPU-only installs use the torch backend): its import
# error is the reason given when backend="nvdiffrast" is requested, or auto falls back on CUDA.
# cpp_extension (which nvdiffrast itself imports) finds the plugin build folder, see _call_nvdiffrast.
try:
    import nvdiffrast.torch as _nvdiffrast
    from torch.utils import cpp_extension
except ImportError as _error:
    _nvdiffrast = cpp_extension = None
    _nvdiffrast_import_error: ImportError | None = _error
else:
    _nvdiffrast_import_error = None

log = logging.getLogger(__name__)

BACKENDS = ("auto", "nvdiffrast", "torch")
ANTIALIAS_METHODS = ("walk", "pixel")


class RasterBackendError(RuntimeError):
    """The requested rasterization backend cannot be used here (the message says why)."""


class RasterInputError(ValueError):
    """A rasterization argument has the wrong shape, dtype or device."""


@dataclass
class RasterContext:
    backend: str                    # "nvdiffrast" | "torch"
    device: torch.device
    nv_context: Any = field(default=None, repr=False)   # nvdiffrast.torch.RasterizeCudaContext


# ----------------------------------------------------------------------------------------------
# nvdiffrast loading


_nv_module: ModuleType | None = None


def _import_nvdiffrast() -> ModuleType:
    if _nvdiffrast is None:
        raise RasterBackendError(
            f"nvdiffrast backend unavailable: cannot import nvdiffrast.torch ({_nvdiffrast_import_error}); "
            "install it with `pip install diffrp-nvdiffrast` (needs a CUDA toolkit and ninja to build its plugin)"
        ) from _nvdiffrast_import_error
    return _nvdiffrast


def _call_nvdiffrast(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call an nvdiffrast function, working around its plugin loader with torch >= 2.6.

    nvdiffrast builds its extension with torch.utils.cpp_extension and then imports it by name, but
    newer torch no longer puts the build directory on sys.path, so the import fails with
    ModuleNotFoundError('nvdiffrast_plugin_...'). Adding that directory and retrying fixes it.
    """
    try:
        return fn(*args, **kwargs)
    except ModuleNotFoundError as exc:
        name = exc.name or ""
        if not name.startswith("nvdiffrast_plugin"):
            raise
        build_dir = cpp_extension._get_build_directory(name, False)
        if build_dir in sys.path:
            raise
        log.info("nvdiffrast: adding plugin build directory %s to sys.path", build_dir)
        sys.path.insert(0, build_dir)
        return fn(*args, **kwargs)


def _load_nvdiffrast(device: torch.device) -> tuple[ModuleType, Any]:
    """(nvdiffrast.torch module, RasterizeCudaContext on `device`) or RasterBackendError."""
    global _nv_module
    if device.type != "cuda":
        raise RasterBackendError(f"nvdiffrast backend needs a CUDA device, got device '{device}'; "
                                 "use backend='torch' or 'auto' on CPU")
    if not torch.cuda.is_available():
        raise RasterBackendError("nvdiffrast backend needs CUDA but torch.cuda.is_available() is False")
    dr = _import_nvdiffrast()
    try:
        nv_ctx = _call_nvdiffrast(dr.RasterizeCudaContext, device=device)
    except Exception as exc:  # plugin compilation / CUDA errors come in many types
        raise RasterBackendError(
            f"nvdiffrast backend unavailable: creating RasterizeCudaContext on {device} failed with "
            f"{type(exc).__name__}: {exc}. Check the CUDA toolkit (nvcc), ninja and "
            "TORCH_CUDA_ARCH_LIST, or use backend='torch'"
        ) from exc
    _nv_module = dr
    return dr, nv_ctx


def clip_positions(verts_vx3: Tensor, mvp_bx4x4: Tensor) -> Tensor:
    """World-space vertices [V, 3] -> clip-space positions [B, V, 4] for each camera's MVP."""
    homog = torch.cat([verts_vx3, torch.ones_like(verts_vx3[:, :1])], dim=1)     # [V, 4]
    return torch.einsum("bij,vj->bvi", mvp_bx4x4, homog).contiguous()


def make_context(device: torch.device | str, backend: str = "auto") -> RasterContext:
    """Create a rasterizer context.

    backend="auto": nvdiffrast's CUDA context on CUDA devices when it loads (a warning names the
    reason when it does not), the torch backend otherwise. "nvdiffrast" raises RasterBackendError
    where it cannot load; "torch" always works.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    if backend not in BACKENDS:
        raise RasterInputError(f"make_context: backend must be one of {BACKENDS}, got '{backend}'")
    if backend == "torch":
        return RasterContext("torch", device)
    if backend == "nvdiffrast":
        _, nv_ctx = _load_nvdiffrast(device)
        return RasterContext("nvdiffrast", device, nv_ctx)
    if device.type != "cuda":
        return RasterContext("torch", device)
    try:
        _, nv_ctx = _load_nvdiffrast(device)
    except RasterBackendError as exc:
        log.warning("backend='auto' on %s: using the torch rasterizer because %s", device, exc)
        return RasterContext("torch", device)
    return RasterContext("nvdiffrast", device, nv_ctx)


def _op_backend(backend: str | RasterContext, device: torch.device) -> str:
    """Backend for ops without a context (interpolate/antialias/texture); semantics are identical."""
    if isinstance(backend, RasterContext):
        return backend.backend
    if backend not in BACKENDS:
        raise RasterInputError(f"backend must be a RasterContext or one of {BACKENDS}, got '{backend}'")
    if backend == "torch":
        return "torch"
    if backend == "nvdiffrast":
        if _nv_module is None or device.type != "cuda":   # once loaded, still refuse CPU tensors
            _load_nvdiffrast(device)
        return "nvdiffrast"
    if device.type == "cuda":
        if _nv_module is not None:
            return "nvdiffrast"
        try:
            _load_nvdiffrast(device)
            return "nvdiffrast"
        except RasterBackendError as exc:
            log.warning("backend='auto' on %s: using the torch backend because %s", device, exc)
    return "torch"


# ----------------------------------------------------------------------------------------------
# Validation


# Every input check of this module raises RasterInputError.
_check_tensor = functools.partial(check_tensor, error=RasterInputError)


def _check_tri(tri: Any, device: torch.device) -> None:
    _check_tensor("tri", tri, torch.int32, device)
    if tri.ndim != 2 or tri.shape[1] != 3:
        raise RasterInputError(f"tri: expected shape [F, 3], got {tuple(tri.shape)}")
    if tri.shape[0] >= raster_torch.MAX_TRIANGLES:
        raise RasterInputError(f"tri: at most {raster_torch.MAX_TRIANGLES - 1} triangles are supported "
                               f"(ids are stored in float32), got {tri.shape[0]}")


def _check_rast(rast: Any, device: torch.device | None = None) -> None:
    _check_tensor("rast", rast, torch.float32, device)
    if rast.ndim != 4 or rast.shape[-1] != 4:
        raise RasterInputError(f"rast: expected shape [B, H, W, 4] from rasterize(), got {tuple(rast.shape)}")


def _check_resolution(resolution: Any) -> tuple[int, int]:
    try:
        h, w = (int(r) for r in resolution)
    except (TypeError, ValueError) as exc:
        raise RasterInputError(f"resolution: expected (height, width), got {resolution!r}") from exc
    if h <= 0 or w <= 0:
        raise RasterInputError(f"resolution: expected positive (height, width), got {resolution!r}")
    return h, w


# ----------------------------------------------------------------------------------------------
# Operations


def rasterize(ctx: RasterContext, pos: Tensor, tri: Tensor, resolution: Sequence[int],
              ranges: Tensor | None = None, grad_db: bool = True) -> tuple[Tensor, Tensor]:
    """Rasterize triangles: returns (rast [B, H, W, 4], rast_db [B, H, W, 4])."""
    if not isinstance(ctx, RasterContext):
        raise RasterInputError(f"ctx: expected a RasterContext from make_context(), got {type(ctx).__name__}")
    _check_tensor("pos", pos, torch.float32, ctx.device)
    _check_tri(tri, ctx.device)
    h, w = _check_resolution(resolution)
    if pos.ndim == 3:
        if pos.shape[-1] != 4:
            raise RasterInputError(f"pos: expected [B, V, 4] clip-space positions, got {tuple(pos.shape)}")
    elif pos.ndim == 2:
        if pos.shape[-1] != 4:
            raise RasterInputError(f"pos: expected [V, 4] clip-space positions, got {tuple(pos.shape)}")
        if ranges is None:
            raise RasterInputError("ranges: range mode (pos [V, 4]) needs ranges [B, 2] int32 "
                                   "(start, count) per image; or pass pos as [B, V, 4]")
        _check_tensor("ranges", ranges, torch.int32, torch.device("cpu"))
        if ranges.ndim != 2 or ranges.shape[1] != 2:
            raise RasterInputError(f"ranges: expected shape [B, 2], got {tuple(ranges.shape)}")
        if bool((ranges[:, 0] < 0).any()) or bool((ranges.sum(1) > tri.shape[0]).any()) \
                or bool((ranges[:, 1] < 0).any()):
            raise RasterInputError(f"ranges: (start, count) rows must lie within [0, {tri.shape[0]}], "
                                   f"got {ranges.tolist()}")
    else:
        raise RasterInputError(f"pos: expected [B, V, 4] or [V, 4], got {tuple(pos.shape)}")
    if ctx.backend == "nvdiffrast":
        dr = _nv_module
        return _call_nvdiffrast(dr.rasterize, ctx.nv_context, pos.contiguous(), tri.contiguous(),
                                (h, w), ranges=ranges, grad_db=grad_db)
    return raster_torch.rasterize(pos, tri, (h, w), ranges=ranges, grad_db=grad_db)


def interpolate(attr: Tensor, rast: Tensor, tri: Tensor, rast_db: Tensor | None = None,
                diff_attrs: Sequence[int] | str | None = None, *,
                backend: str | RasterContext = "auto") -> tuple[Tensor, Tensor]:
    """Interpolate vertex attributes `attr` ([B, V, C] or [V, C]) over `rast`.

    Returns (out [B, H, W, C], out_db [B, H, W, 2*len(diff_attrs)] or [B, H, W, 0]); out_db holds
    (dA/dX, dA/dY) per selected attribute and needs `rast_db`. diff_attrs may be "all".
    """
    _check_rast(rast)
    _check_tensor("attr", attr, torch.float32, rast.device)
    _check_tri(tri, rast.device)
    b = rast.shape[0]
    if attr.ndim not in (2, 3) or (attr.ndim == 3 and attr.shape[0] not in (1, b)):
        raise RasterInputError(f"attr: expected [V, C] or [1 or B={b}, V, C], got {tuple(attr.shape)}")
    channels = attr.shape[-1]
    if diff_attrs is not None:
        if isinstance(diff_attrs, str):
            if diff_attrs != "all":
                raise RasterInputError(f"diff_attrs: expected a list of indices or 'all', got '{diff_attrs}'")
            diff_list = list(range(channels))
        else:
            diff_list = [int(i) for i in diff_attrs]
            bad = [i for i in diff_list if not 0 <= i < channels]
            if bad:
                raise RasterInputError(f"diff_attrs: indices must be in [0, {channels - 1}], got {bad}")
        if diff_list:
            if rast_db is None:
                raise RasterInputError("rast_db: diff_attrs needs rast_db (the second output of rasterize)")
            _check_tensor("rast_db", rast_db, torch.float32, rast.device)
            if rast_db.shape != rast.shape:
                raise RasterInputError(f"rast_db: expected shape {tuple(rast.shape)}, got {tuple(rast_db.shape)}")
    else:
        diff_list = []
    if _op_backend(backend, rast.device) == "nvdiffrast":
        return _call_nvdiffrast(_nv_module.interpolate, attr.contiguous(), rast.contiguous(),
                                tri.contiguous(), rast_db=rast_db if diff_list else None,
                                diff_attrs=diff_list if diff_list else None)
    return raster_torch.interpolate(attr, rast, tri, rast_db, diff_list or None)


def _check_method(method: Any) -> None:
    if method not in ANTIALIAS_METHODS:
        raise RasterInputError(f"method: expected one of {ANTIALIAS_METHODS}, got {method!r}")


def antialias_topology(tri: Tensor, num_vertices: int, *, backend: str | RasterContext = "auto",
                       method: str = "pixel") -> Any:
    """The mesh topology antialias() needs, built once per mesh: for method "walk" the edge
    neighbours (silhouette.silhouette_topology, on any backend; fixed-size ops, so it may be built
    inside a CUDA graph capture), for "pixel" nvdiffrast's topology hash or the torch backend's
    opposite-vertex table. Depends only on `tri`, so it can be built before rasterizing."""
    _check_tri(tri, tri.device)
    _check_method(method)
    op_backend = _op_backend(backend, tri.device)
    if method == "walk":
        return silhouette.silhouette_topology(tri, num_vertices)
    if op_backend == "nvdiffrast":
        return _call_nvdiffrast(_nv_module.antialias_construct_topology_hash, tri.contiguous())
    return raster_torch.opposite_vertices(tri, num_vertices)


def antialias(color: Tensor, rast: Tensor, pos: Tensor, tri: Tensor, *,
              backend: str | RasterContext = "auto", topology: Any = None, method: str = "pixel",
              walk_kernel: str = "auto") -> Tensor:
    """Analytic antialiasing of silhouette edges; gives vertex positions a gradient at silhouettes.

    method "walk": render/silhouette.py on either backend, its search run by `walk_kernel`
    ("auto": Triton on CUDA when it imports, else PyTorch; "torch"; "triton"). "pixel":
    nvdiffrast's antialias (or its PyTorch copy on the torch backend).
    `topology`: antialias_topology(tri, ..., method=method) of the same backend, if already built.
    """
    _check_rast(rast)
    _check_tensor("color", color, torch.float32, rast.device)
    _check_tensor("pos", pos, torch.float32, rast.device)
    _check_tri(tri, rast.device)
    _check_method(method)
    if color.ndim != 4 or color.shape[:3] != rast.shape[:3]:
        raise RasterInputError(f"color: expected [B, H, W, C] with [B, H, W] = {tuple(rast.shape[:3])}, "
                               f"got {tuple(color.shape)}")
    if pos.ndim not in (2, 3) or pos.shape[-1] != 4 or (pos.ndim == 3 and pos.shape[0] != rast.shape[0]):
        raise RasterInputError(f"pos: expected the [B, V, 4] or [V, 4] tensor given to rasterize, "
                               f"got {tuple(pos.shape)}")
    if (topology is not None) and (method == "walk") != isinstance(topology, SilhouetteTopology):
        raise RasterInputError(f"topology: expected antialias_topology(tri, V, method='{method}'), got one "
                               f"built for method '{'pixel' if method == 'walk' else 'walk'}'")
    op_backend = _op_backend(backend, rast.device)
    if method == "walk":
        return silhouette.antialias_walk(color, rast, pos, tri, topology, kernel=walk_kernel)
    if op_backend == "nvdiffrast":
        return _call_nvdiffrast(_nv_module.antialias, color.contiguous(), rast.contiguous(),
                                pos.contiguous(), tri.contiguous(), topology_hash=topology)
    return raster_torch.antialias(color, rast, pos, tri, opposite=topology)


def texture(tex: Tensor, uv: Tensor, uv_da: Tensor | None = None, mip_level_bias: Tensor | None = None,
            mip: Any = None, filter_mode: str = "auto", boundary_mode: str = "wrap",
            max_mip_level: int | None = None, *, backend: str | RasterContext = "auto") -> Tensor:
    """Texture lookup with nvdiffrast semantics (render/texture_torch.py on the torch backend)."""
    _check_tensor("tex", tex, None, None)
    _check_tensor("uv", uv, None, tex.device)
    if _op_backend(backend, tex.device) == "nvdiffrast":
        return _call_nvdiffrast(_nv_module.texture, tex.contiguous(), uv.contiguous(), uv_da=uv_da,
                                mip_level_bias=mip_level_bias, mip=mip, filter_mode=filter_mode,
                                boundary_mode=boundary_mode, max_mip_level=max_mip_level)
    return texture_torch(tex, uv, uv_da=uv_da, mip_level_bias=mip_level_bias, mip=mip,
                         filter_mode=filter_mode, boundary_mode=boundary_mode,
                         max_mip_level=max_mip_level)
