"""Camera sampling for training, validation and turntables (pure camera math; no render/ imports).

Conventions (docs/DESIGN.md, "Conventions and formulas"): world y up, the object's front faces +z.
- model-view = translate(jx, jy, -radius) @ rotate_x(-elevation) @ rotate_y(azimuth), with
  rotate_x / rotate_y as in nvdiffrec (`rotate_x(a)` turns by -a about +x in the right-hand sense,
  `rotate_y(a)` by +a about +y). The camera then sits at
  radius * (-cos(e) sin(a), sin(e), cos(e) cos(a)) (for zero jitter): azimuth 0 looks at the front
  from +z, positive elevation is above the object.
- projection: OpenGL perspective (fovy, aspect W/H, near/far) with the y axis negated, as in
  nvdiffrec, so that rasterized image row 0 (NDC y = -1 in nvdiffrast) is the *top* of the view and
  images come out upright.
- Angles in CameraBatch are radians; options are in degrees (config convention).
All randomness comes from the caller's torch.Generator (one stream per rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor


class CameraOptionsError(ValueError):
    """Invalid camera option or sampling argument."""


@dataclass
class CameraOptions:
    fovy_range: tuple[float, float] = (25.71, 45.0)          # degrees
    elevation_range: tuple[float, float] = (-10.0, 45.0)     # degrees, positive = camera above
    camera_random_jitter: float = 0.4                        # +- offset of the look-at in view x/y
    cam_near_far: tuple[float, float] = (1.0, 50.0)
    resolution: tuple[int, int] = (512, 512)                 # (H, W)
    radius: float = 3.0
    front_threshold: float = 45.0                            # degrees

    def __post_init__(self) -> None:
        for name in ("fovy_range", "elevation_range", "cam_near_far"):
            lo, hi = getattr(self, name)
            if not lo <= hi:
                raise CameraOptionsError(f"{name}: expected (lo, hi) with lo <= hi, got ({lo}, {hi})")
        if not (0.0 < self.fovy_range[0] and self.fovy_range[1] < 180.0):
            raise CameraOptionsError(f"fovy_range: expected degrees in (0, 180), got {self.fovy_range}")
        if not 0.0 < self.cam_near_far[0] < self.cam_near_far[1]:
            raise CameraOptionsError(f"cam_near_far: expected 0 < near < far, got {self.cam_near_far}")
        if self.camera_random_jitter < 0:
            raise CameraOptionsError(f"camera_random_jitter: expected >= 0, got {self.camera_random_jitter}")
        if not 0.0 < self.front_threshold < 90.0:
            raise CameraOptionsError(f"front_threshold: expected degrees in (0, 90), got {self.front_threshold}")
        if len(self.resolution) != 2 or min(self.resolution) <= 0:
            raise CameraOptionsError(f"resolution: expected positive (H, W), got {self.resolution}")


@dataclass
class CameraBatch:
    mv: Tensor              # [B, 4, 4] world -> camera
    mvp: Tensor             # [B, 4, 4] world -> clip
    campos: Tensor          # [B, 3] camera position in world space
    azimuth: Tensor         # [B] radians in (-pi, pi]
    elevation: Tensor       # [B] radians
    fovy: Tensor            # [B] radians
    view_index: Tensor      # [B] int64: 0 front, 1 side, 2 back, 3 side
    normal_rotate: Tensor   # [B, 3, 3] rotation about y (identity when not sampled)
    resolution: tuple[int, int]
    azimuth_deg_host: tuple[float, ...] = ()   # the azimuths in degrees, on the host (for the log)
    # The CUDA stream the tensors were copied on (sample_train_cameras' `stream`), or None. The
    # current stream already waits for that copy; work queued on `stream` needs no other input.
    stream: torch.cuda.Stream | None = None

    def to(self, device: torch.device | str) -> "CameraBatch":
        return CameraBatch(**{f.name: (getattr(self, f.name).to(device)
                                       if isinstance(getattr(self, f.name), Tensor) else getattr(self, f.name))
                              for f in fields(self)})

    def __len__(self) -> int:
        return int(self.mv.shape[0])


# ----------------------------------------------------------------------------------------------
# Matrices (float64 math, float32 results)


def translate(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """[B] x3 -> [B, 4, 4]."""
    m = torch.eye(4, dtype=x.dtype, device=x.device).repeat(x.shape[0], 1, 1)
    m[:, 0, 3], m[:, 1, 3], m[:, 2, 3] = x, y, z
    return m


def rotate_x(a: Tensor) -> Tensor:
    """nvdiffrec's rotate_x: [[1,0,0],[0,c,s],[0,-s,c]] (a turn by -a about +x). a [B] -> [B, 4, 4]."""
    c, s = torch.cos(a), torch.sin(a)
    m = torch.eye(4, dtype=a.dtype, device=a.device).repeat(a.shape[0], 1, 1)
    m[:, 1, 1], m[:, 1, 2], m[:, 2, 1], m[:, 2, 2] = c, s, -s, c
    return m


def rotate_y(a: Tensor) -> Tensor:
    """nvdiffrec's rotate_y: [[c,0,s],[0,1,0],[-s,0,c]] (a turn by +a about +y). a [B] -> [B, 4, 4]."""
    c, s = torch.cos(a), torch.sin(a)
    m = torch.eye(4, dtype=a.dtype, device=a.device).repeat(a.shape[0], 1, 1)
    m[:, 0, 0], m[:, 0, 2], m[:, 2, 0], m[:, 2, 2] = c, s, -s, c
    return m


def perspective(fovy: Tensor, aspect: float, near: float, far: float) -> Tensor:
    """OpenGL perspective with y negated (upright images in nvdiffrast). fovy [B] rad -> [B, 4, 4]."""
    y = torch.tan(fovy / 2)
    m = torch.zeros(fovy.shape[0], 4, 4, dtype=fovy.dtype, device=fovy.device)
    m[:, 0, 0] = 1.0 / (y * aspect)
    m[:, 1, 1] = -1.0 / y
    m[:, 2, 2] = -(far + near) / (far - near)
    m[:, 2, 3] = -(2.0 * far * near) / (far - near)
    m[:, 3, 2] = -1.0
    return m


# ----------------------------------------------------------------------------------------------
# Sectors and view index


def azimuth_sector(rank: int, world_size: int) -> tuple[float, float]:
    """Azimuth sector [lo, hi) in degrees for `rank` of `world_size`.

    world_size < 4: the circle is split evenly, rank r gets [-45 + 360r/W, -45 + 360(r+1)/W).
    world_size >= 4: rank r gets sector k = r mod 4 of front/left/back/right, [-45 + 90k, 45 + 90k).
    (With emulated GPUs pass virtual_rank(...) and world_size * emulate_gpus.)
    """
    if world_size < 1:
        raise CameraOptionsError(f"world_size: expected >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise CameraOptionsError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    if world_size < 4:
        span = 360.0 / world_size
        return -45.0 + span * rank, -45.0 + span * (rank + 1)
    k = rank % 4
    return -45.0 + 90.0 * k, 45.0 + 90.0 * k


def virtual_rank(rank: int, world_size: int, j: int, emulate_gpus: int = 1) -> int:
    """Rank of emulated GPU j (0 <= j < emulate_gpus) run by `rank`: rank + world_size * j.

    The matching sector is azimuth_sector(virtual_rank(...), world_size * emulate_gpus).
    """
    if not 0 <= j < emulate_gpus:
        raise CameraOptionsError(f"j: expected 0 <= j < emulate_gpus={emulate_gpus}, got {j}")
    if not 0 <= rank < world_size:
        raise CameraOptionsError(f"rank: expected 0 <= rank < world_size={world_size}, got {rank}")
    return rank + world_size * j


def wrap_degrees(deg: Tensor) -> Tensor:
    """Map degrees into (-180, 180]."""
    return 180.0 - torch.remainder(180.0 - deg, 360.0)


def view_index(azimuth_rad: Tensor, front_threshold_deg: float = 45.0) -> Tensor:
    """0 front [-f, f), 1 side [f, pi-f), 2 back [pi-f, pi] U [-pi, -pi+f), 3 side [-pi+f, -f).

    Boundaries are compared in the input's dtype so exact boundary angles classify as documented.
    """
    a = azimuth_rad
    f = torch.tensor(math.radians(front_threshold_deg), dtype=a.dtype, device=a.device)
    pf = torch.tensor(math.pi - math.radians(front_threshold_deg), dtype=a.dtype, device=a.device)
    idx = torch.full(a.shape, 2, dtype=torch.int64, device=a.device)         # back by default
    idx = torch.where((a >= -f) & (a < f), 0, idx)
    idx = torch.where((a >= f) & (a < pf), 1, idx)
    idx = torch.where((a >= -pf) & (a < -f), 3, idx)
    return idx


# ----------------------------------------------------------------------------------------------
# Batches


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator) -> Tensor:
    """[n] float64 uniform in [lo, hi), drawn on the generator's device, returned on CPU."""
    u = torch.rand(n, generator=generator, dtype=torch.float64, device=generator.device).cpu()
    return lo + (hi - lo) * u


def _y_rotation3(angle: Tensor) -> Tensor:
    """[B] rad -> [B, 3, 3] right-handed rotation about +y."""
    c, s = torch.cos(angle), torch.sin(angle)
    m = torch.eye(3, dtype=angle.dtype).repeat(angle.shape[0], 1, 1)
    m[:, 0, 0], m[:, 0, 2], m[:, 2, 0], m[:, 2, 2] = c, s, -s, c
    return m


def _build(azimuth_deg: Tensor, elevation_deg: Tensor, fovy_deg: Tensor, jitter: Tensor,
           normal_angle: Tensor | None, opts: CameraOptions, device: torch.device | str,
           stream: torch.cuda.Stream | None = None) -> CameraBatch:
    """All inputs float64 on CPU, [B] (jitter [B, 2])."""
    az = torch.deg2rad(wrap_degrees(azimuth_deg))
    el = torch.deg2rad(elevation_deg)
    fovy = torch.deg2rad(fovy_deg)
    b = az.shape[0]
    zeros = torch.zeros(b, dtype=torch.float64)
    mv = translate(jitter[:, 0], jitter[:, 1], zeros - opts.radius) @ rotate_x(-el) @ rotate_y(az)
    h, w = opts.resolution
    proj = perspective(fovy, w / h, opts.cam_near_far[0], opts.cam_near_far[1])
    mvp = proj @ mv
    campos = torch.linalg.inv(mv)[:, :3, 3]
    rot = _y_rotation3(normal_angle) if normal_angle is not None else torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    az32 = az.float()
    host = {"mv": mv, "mvp": mvp, "campos": campos, "azimuth": az32, "elevation": el, "fovy": fovy,
            "view_index": view_index(az32, opts.front_threshold), "normal_rotate": rot}
    device = torch.device(device)
    stream = stream if device.type == "cuda" else None
    return CameraBatch(**_to_device(host, device, stream), resolution=(int(h), int(w)),
                       azimuth_deg_host=tuple(math.degrees(a) for a in az32.tolist()), stream=stream)


def _to_device(host: dict[str, Tensor], device: torch.device,
               stream: torch.cuda.Stream | None = None) -> dict[str, Tensor]:
    """CPU tensors -> float32 (view_index int64) on ``device`` in one transfer.

    A copy from pageable host memory synchronizes the stream first, so eight separate ``.to(cuda)``
    calls stalled every training step eight times; one pinned, non-blocking copy does not stall.
    With `stream`, the copy is queued there, not behind the current stream's work, and the current
    stream waits for it.
    """
    flat = torch.cat([t.reshape(-1).float() for t in host.values()])   # view_index 0..3: exact in fp32
    if device.type != "cuda":
        return _unpack(flat.to(device), host)
    current = torch.cuda.current_stream(device)
    with torch.cuda.stream(stream or current):
        out = _unpack(flat.pin_memory().to(device, non_blocking=True), host)
    if stream is not None:
        current.wait_stream(stream)
        for t in out.values():
            t.record_stream(current)     # made on `stream`, used on the current one too
    return out


def _unpack(flat: Tensor, host: dict[str, Tensor]) -> dict[str, Tensor]:
    out, offset = {}, 0
    for name, t in host.items():
        part = flat[offset:offset + t.numel()].view(t.shape)
        out[name] = part.long() if name == "view_index" else part
        offset += t.numel()
    return out


def sample_train_cameras(batch: int, sector: tuple[float, float], opts: CameraOptions,
                         generator: torch.Generator, device: torch.device | str,
                         stream: torch.cuda.Stream | None = None) -> CameraBatch:
    """Random training cameras: azimuth ~ U[sector) degrees, elevation ~ U(elevation_range),
    fovy ~ U(fovy_range), jitter ~ U(+-camera_random_jitter) in view x and y, and a uniform random
    normal rotation about y in [-pi, pi). `stream` (CUDA): copy them to the device on that stream
    (see CameraBatch.stream)."""
    if batch < 1:
        raise CameraOptionsError(f"batch: expected >= 1, got {batch}")
    lo, hi = float(sector[0]), float(sector[1])
    if not lo < hi <= lo + 360.0:
        raise CameraOptionsError(f"sector: expected (lo, hi) degrees with lo < hi <= lo + 360, got {sector}")
    az = _uniform(batch, lo, hi, generator)
    el = _uniform(batch, *opts.elevation_range, generator)
    fovy = _uniform(batch, *opts.fovy_range, generator)
    j = opts.camera_random_jitter
    jitter = torch.stack([_uniform(batch, -j, j, generator), _uniform(batch, -j, j, generator)], dim=1)
    normal_angle = _uniform(batch, -math.pi, math.pi, generator)
    return _build(az, el, fovy, jitter, normal_angle, opts, device, stream)


def _fixed_cameras(azimuth_deg: Tensor, elevation_deg: float, opts: CameraOptions,
                   device: torch.device | str) -> CameraBatch:
    n = azimuth_deg.shape[0]
    fovy = torch.full((n,), 0.5 * (opts.fovy_range[0] + opts.fovy_range[1]), dtype=torch.float64)
    el = torch.full((n,), float(elevation_deg), dtype=torch.float64)
    return _build(azimuth_deg, el, fovy, torch.zeros(n, 2, dtype=torch.float64), None, opts, device)


def validation_cameras(opts: CameraOptions, device: torch.device | str, n: int = 4,
                       elevation_deg: float = 0.0) -> CameraBatch:
    """n views evenly spaced in azimuth from 0 (n=4: 0/90/180/270 degrees), no jitter, mean fovy."""
    if n < 1:
        raise CameraOptionsError(f"n: expected >= 1, got {n}")
    return _fixed_cameras(torch.arange(n, dtype=torch.float64) * (360.0 / n), elevation_deg, opts, device)


def turntable_cameras(opts: CameraOptions, device: torch.device | str, n_frames: int,
                      elevation_deg: float = 15.0) -> CameraBatch:
    """n_frames views turning once around the object starting at the front, slightly from above."""
    if n_frames < 1:
        raise CameraOptionsError(f"n_frames: expected >= 1, got {n_frames}")
    az = torch.arange(n_frames, dtype=torch.float64) * (360.0 / n_frames)
    return _fixed_cameras(az, elevation_deg, opts, device)
