"""dataset/cameras.py: sectors, view index, camera geometry, determinism."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

from dataset.cameras import (
    CameraOptions,
    CameraOptionsError,
    azimuth_sector,
    sample_train_cameras,
    turntable_cameras,
    validation_cameras,
    view_index,
    virtual_rank,
)

OPTS = CameraOptions(resolution=(64, 64))


def _in_sector(az_deg: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Membership of wrapped azimuths in [lo, hi) modulo 360 (small float slack)."""
    rel = torch.remainder(az_deg - lo, 360.0)
    return (rel >= -1e-4) & (rel < (hi - lo) + 1e-4)


@pytest.mark.parametrize("world_size", range(1, 9))
def test_sectors_cover_circle_and_samples_stay_inside(world_size: int) -> None:
    sectors = [azimuth_sector(r, world_size) for r in range(world_size)]
    # Union covers the circle: every whole and half degree falls in some sector.
    probe = torch.arange(-180.0, 180.0, 0.5, dtype=torch.float64)
    covered = torch.zeros_like(probe, dtype=torch.bool)
    for lo, hi in sectors:
        covered |= _in_sector(probe, lo, hi)
    assert bool(covered.all())
    for rank, (lo, hi) in enumerate(sectors):
        gen = torch.Generator().manual_seed(1234 + rank)
        cams = sample_train_cameras(256, (lo, hi), OPTS, gen, "cpu")
        az_deg = torch.rad2deg(cams.azimuth.double())
        assert bool(_in_sector(az_deg, lo, hi).all()), (rank, lo, hi)
        assert float(cams.azimuth.min()) > -math.pi - 1e-6 and float(cams.azimuth.max()) <= math.pi + 1e-6


def test_sector_layouts() -> None:
    assert azimuth_sector(0, 1) == (-45.0, 315.0)
    assert azimuth_sector(1, 2) == (135.0, 315.0)
    assert [azimuth_sector(r, 8) for r in (0, 5)] == [(-45.0, 45.0), (45.0, 135.0)]
    with pytest.raises(CameraOptionsError, match="rank"):
        azimuth_sector(3, 3)


def test_virtual_rank_emulation() -> None:
    # 2 real GPUs emulating 2 each -> 4 virtual ranks, one per quadrant.
    sectors = {azimuth_sector(virtual_rank(r, 2, j, 2), 4) for r in range(2) for j in range(2)}
    assert sectors == {(-45.0, 45.0), (45.0, 135.0), (135.0, 225.0), (225.0, 315.0)}
    with pytest.raises(CameraOptionsError, match="emulate_gpus"):
        virtual_rank(0, 2, 2, 2)


def test_view_index_boundaries() -> None:
    deg = [0.0, 44.999, 45.0, 134.999, 135.0, 180.0, -180.0, -135.001, -135.0, -45.001, -45.0]
    expected = [0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 0]
    az = torch.tensor([math.radians(d) for d in deg], dtype=torch.float32)
    assert view_index(az, 45.0).tolist() == expected
    az64 = torch.tensor([math.radians(d) for d in deg], dtype=torch.float64)
    assert view_index(az64, 45.0).tolist() == expected


def test_camera_at_distance_three_looking_at_origin() -> None:
    opts = CameraOptions(resolution=(64, 64), camera_random_jitter=0.0)
    cams = sample_train_cameras(64, (-45.0, 315.0), opts, torch.Generator().manual_seed(0), "cpu")
    assert torch.allclose(cams.campos.norm(dim=-1), torch.full((64,), 3.0), atol=1e-5)
    # The origin projects to the image centre.
    origin = cams.mvp @ torch.tensor([0.0, 0.0, 0.0, 1.0])
    assert torch.allclose(origin[:, :2] / origin[:, 3:], torch.zeros(64, 2), atol=1e-5)
    # The view direction (-z of the camera) points from the camera to the origin.
    forward = -cams.mv[:, 2, :3]                                     # world-space camera -z
    assert torch.allclose(forward, -cams.campos / 3.0, atol=1e-5)
    # Elevation is the angle above the xz plane; positive = above.
    assert torch.allclose(torch.asin(cams.campos[:, 1] / 3.0), cams.elevation, atol=1e-4)


def test_front_view_and_upright_image() -> None:
    cams = validation_cameras(OPTS, "cpu")
    assert torch.allclose(cams.campos[0], torch.tensor([0.0, 0.0, 3.0]), atol=1e-5)   # front from +z
    assert cams.view_index.tolist() == [0, 1, 2, 3]
    assert torch.allclose(torch.rad2deg(cams.azimuth), torch.tensor([0.0, 90.0, 180.0, -90.0]), atol=1e-4)
    # A point above the origin lands in the lower NDC-y half = top image rows for nvdiffrast.
    up = cams.mvp[0] @ torch.tensor([0.0, 0.5, 0.0, 1.0])
    assert float(up[1] / up[3]) < 0.0
    # Positive elevation puts the camera above.
    high = validation_cameras(OPTS, "cpu", elevation_deg=30.0)
    assert bool((high.campos[:, 1] > 1.0).all())


def test_sampling_ranges_and_determinism() -> None:
    opts = CameraOptions(resolution=(32, 48), fovy_range=(30.0, 40.0), elevation_range=(-10.0, 45.0),
                         camera_random_jitter=0.2)
    a = sample_train_cameras(128, (-45.0, 45.0), opts, torch.Generator().manual_seed(7), "cpu")
    b = sample_train_cameras(128, (-45.0, 45.0), opts, torch.Generator().manual_seed(7), "cpu")
    c = sample_train_cameras(128, (-45.0, 45.0), opts, torch.Generator().manual_seed(8), "cpu")
    assert torch.equal(a.mvp, b.mvp) and not torch.equal(a.mvp, c.mvp)
    deg = torch.rad2deg
    assert float(deg(a.fovy).min()) >= 30.0 - 1e-4 and float(deg(a.fovy).max()) <= 40.0 + 1e-4
    assert float(deg(a.elevation).min()) >= -10.0 - 1e-4 and float(deg(a.elevation).max()) <= 45.0 + 1e-4
    assert a.resolution == (32, 48)
    assert a.mv.shape == (128, 4, 4) and a.campos.shape == (128, 3) and a.view_index.dtype == torch.int64
    # normal_rotate: proper rotations about y with spread-out angles.
    r = a.normal_rotate
    assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3).expand(128, 3, 3), atol=1e-5)
    assert torch.allclose(r[:, 1], torch.tensor([0.0, 1.0, 0.0]).expand(128, 3), atol=1e-6)
    angles = torch.atan2(r[:, 0, 2], r[:, 0, 0])
    assert float(angles.min()) < -2.0 and float(angles.max()) > 2.0
    # Aspect ratio W/H: the projection's x scale is its y scale divided by W/H.
    proj = a.mvp @ torch.linalg.inv(a.mv)
    assert torch.allclose(proj[:, 0, 0] * (48 / 32), -proj[:, 1, 1], rtol=1e-4)


def test_turntable() -> None:
    cams = turntable_cameras(OPTS, "cpu", n_frames=12, elevation_deg=20.0)
    assert len(cams) == 12
    assert torch.allclose(cams.campos.norm(dim=-1), torch.full((12,), 3.0), atol=1e-5)
    assert torch.allclose(torch.rad2deg(cams.elevation), torch.full((12,), 20.0), atol=1e-4)
    steps = torch.remainder(torch.diff(torch.rad2deg(cams.azimuth.double())), 360.0)
    assert torch.allclose(steps, torch.full((11,), 30.0, dtype=torch.float64), atol=1e-3)


def test_option_validation() -> None:
    with pytest.raises(CameraOptionsError, match="fovy_range"):
        CameraOptions(fovy_range=(50.0, 40.0))
    with pytest.raises(CameraOptionsError, match="cam_near_far"):
        CameraOptions(cam_near_far=(0.0, 10.0))
    with pytest.raises(CameraOptionsError, match="sector"):
        sample_train_cameras(2, (10.0, 10.0), OPTS, torch.Generator(), "cpu")


def test_dataset_does_not_import_render_or_geometry() -> None:
    src = Path(__file__).resolve().parents[1] / "dataset" / "cameras.py"
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            assert not any(n.split(".")[0] in ("render", "geometry", "sd") for n in names), names
