"""Appearance training on CPU: target-mesh guidance recovers a known albedo to
>= 25 dB PSNR at held-out views, and resume continues an appearance run exactly.

The run-folder / export end-to-end checks live in tests/test_export_e2e.py. Runs go through
train.py's main() in-process, like tests/test_train_geometry.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

from config import build_config
from dataset.cameras import validation_cameras
from distributed import DistInfo
from geometry.fixed_mesh import FixedMeshGeometry
from phases.appearance import AppearancePhase
from render.mesh import load_mesh
from render.pbr_render import rasterize_gbuffer, render_textured
from tests.run_helpers import check_resume_matches_straight_run, read_log, run_train, write_config
from trainer import camera_options

# One process, no emulate_gpus: the trainer's sector-coverage advice is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:each optimizer step draws cameras")

# A UV-mapped egg: lat-long UVs, outward faces (y up, front +z as in docs/DESIGN.md, "Conventions and formulas").
EGG_RADII = (0.6, 0.7, 0.6)
ALBEDO_SIZE = 128
# Fixed ks (occlusion, roughness, metallic): with ks_min == ks_max only the albedo can learn.
FIXED_KS = [0.0, 0.5, 0.0]
# Regression threshold from the full-scale strategy-0 run (34.2 dB at 512^2, 2000 it,
# docs/RESULTS.md): this 96^2, 150-iteration run measured 29.2 dB; 0.8x the full-scale value.
PSNR_TARGET_DB = 27.0


# ------------------------------------------------------------------------------------------------
# The textured target
# ------------------------------------------------------------------------------------------------
def albedo_image(size: int = ALBEDO_SIZE) -> np.ndarray:
    """[size, size, 3] uint8, rows top-down. Low frequency on purpose: the exact denoiser sees the
    image through 8x8 average pooling, so only patterns a few latent pixels wide are recoverable.
    Hue turns once around the object (u) and blue rises towards the top (v)."""
    t = (np.arange(size) + 0.5) / size
    u, v = np.meshgrid(t, 1.0 - t, indexing="xy")           # image row 0 is v = 1 (OBJ convention)
    rgb = np.stack([0.5 + 0.35 * np.cos(2 * np.pi * u), 0.5 + 0.35 * np.sin(2 * np.pi * u),
                    0.15 + 0.7 * v], axis=-1)
    return (rgb * 255 + 0.5).astype(np.uint8)


def egg_grid(n_lat: int, n_lon: int) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int, int]]]:
    """Lat-long grid: positions [V, 3], UVs [V, 2], faces; the u seam column is duplicated and the
    pole rows keep one triangle per quad (the other would be degenerate)."""
    theta = np.linspace(0.0, np.pi, n_lat + 1)               # polar angle from +y
    phi = np.linspace(-np.pi, np.pi, n_lon + 1)              # azimuth, 0 at +z
    th, ph = np.meshgrid(theta, phi, indexing="ij")
    rx, ry, rz = EGG_RADII
    pos = np.stack([rx * np.sin(th) * np.sin(ph), ry * np.cos(th), rz * np.sin(th) * np.cos(ph)], -1)
    uv = np.stack([(ph + np.pi) / (2 * np.pi), 1.0 - th / np.pi], -1)
    faces = []
    for i in range(n_lat):
        for j in range(n_lon):
            a = i * (n_lon + 1) + j
            b, c = a + 1, a + n_lon + 1
            if i > 0:
                faces.append((a, c, b))
            if i < n_lat - 1:
                faces.append((b, c, c + 1))
    return pos.reshape(-1, 3), uv.reshape(-1, 2), faces


def write_textured_egg(folder: Path, n_lat: int = 16, n_lon: int = 32) -> Path:
    """OBJ + MTL (map_Kd) + albedo PNG; returns the OBJ path."""

    folder.mkdir(parents=True, exist_ok=True)
    pos, uv, faces = egg_grid(n_lat, n_lon)
    lines = ["mtllib egg.mtl", "usemtl albedo"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in pos]
    lines += [f"vt {s:.6f} {t:.6f}" for s, t in uv]
    lines += ["f " + " ".join(f"{k + 1}/{k + 1}" for k in face) for face in faces]
    (folder / "egg.obj").write_text("\n".join(lines) + "\n")
    (folder / "egg.mtl").write_text("newmtl albedo\nKd 1 1 1\nmap_Kd albedo.png\n")
    iio.imwrite(folder / "albedo.png", albedo_image())
    return folder / "egg.obj"


@pytest.fixture(scope="module")
def textured_egg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_textured_egg(tmp_path_factory.mktemp("egg"))


def test_textured_egg_is_a_valid_target(textured_egg: Path) -> None:
    """Guards the fixture: outward faces, UVs on every vertex, the albedo image attached."""

    mesh = trimesh.load(textured_egg, process=False)
    assert mesh.visual.uv is not None and mesh.visual.uv.shape == (len(mesh.vertices), 2)
    assert mesh.visual.material.image is not None
    outward = np.einsum("ij,ij->i", mesh.face_normals, mesh.triangles_center) > 0
    assert outward.all()


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
def load_phase(run_dir: Path, trained: bool = True):
    """The run's AppearancePhase rebuilt from its resolved config (+ its checkpoint when trained)."""

    cfg = build_config(json.loads((run_dir / "config.json").read_text()))
    phase = AppearancePhase(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")),
                            run_dir)
    if trained:
        state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
        phase.load_state_dict(state["phase"])
    return phase


def heldout_cameras(cfg, n: int = 8, elevation_deg: float = 20.0):
    """Fixed views (no jitter, mean fovy) that training never drew: its cameras are random and
    jittered, so no trained view coincides with these."""

    return validation_cameras(camera_options(cfg, [128, 128]), torch.device("cpu"), n=n,
                              elevation_deg=elevation_deg)


def albedo_psnr(phase, cams) -> float:
    """PSNR (dB) of the learned albedo vs the target's, both rendered in 'kd' mode (sRGB) from the
    same cameras, over the pixels the mesh covers."""

    target = FixedMeshGeometry(load_mesh(phase.cfg.target_mesh)).mesh()
    with torch.no_grad():
        got = phase._render(cams, mode="kd", background="white")
        want = render_textured(phase.ctx, target, cams.mvp, cams.campos, cams.resolution, phase.light,
                               tuple(FIXED_KS), mode="kd", background="white")
        covered = rasterize_gbuffer(phase.ctx, target, cams.mvp, cams.resolution).mask[..., 0] > 0
    assert covered.sum() > 0.1 * covered.numel()            # the object fills the views
    mse = float(((got - want)[covered] ** 2).mean())
    return -10.0 * math.log10(max(mse, 1e-12))


# ------------------------------------------------------------------------------------------------
# 1. Target-mesh guidance recovers the albedo
# ------------------------------------------------------------------------------------------------
def recovery_config(target: Path, run_dir: Path) -> dict[str, Any]:
    # base_mesh == target geometry, fixed ks, no bump: the albedo is the only unknown. At 96^2
    # the egg spans ~8 pooled latent pixels, enough for the pattern; larger images only add
    # per-step cost (and fine hash-grid noise the 8x8 pooling cannot see). Strategy 0's weight
    # sqrt(a)(1-a) times the exact denoiser's sqrt(a/(1-a)) varies little over t in [0.02, 0.5],
    # so Adam sees steady gradients. A 2^17-row table: at 2^16 hash collisions blur the pattern
    # (26.3 dB), the published 2^19 only costs time.
    return {"mode": "appearance_modeling", "guidance": "target_mesh", "target_mesh": str(target),
            "base_mesh": str(target), "device": "cpu", "seed": 3, "env_res": 64,
            "train_res": [96, 96], "batch": 2, "iter": 150, "coarse_iter": 0, "save_interval": 150,
            "if_use_bump": False, "ks_min": FIXED_KS, "ks_max": FIXED_KS,
            "sds_weight_strategy": 0, "early_time_step_range": [0.02, 0.5],
            "late_time_step_range": [0.02, 0.5], "texture_res": [64, 64],
            "validate": False, "video_frames": 0, "out_dir": str(run_dir), "hash_table_log2": 17}


@pytest.mark.slow
def test_target_mesh_guidance_recovers_the_albedo(tmp_path: Path, textured_egg: Path) -> None:
    run_dir = tmp_path / "run"
    assert run_train(write_config(tmp_path, recovery_config(textured_egg, run_dir))) == 0
    log = read_log(run_dir)
    assert len(log) == 150 and all(r["nonfinite"] == 0 and not r["skipped"] for r in log)

    before = load_phase(run_dir, trained=False)             # the same seed's untrained material
    after = load_phase(run_dir)
    cams = heldout_cameras(after.cfg)
    psnr_before, psnr_after = albedo_psnr(before, cams), albedo_psnr(after, cams)
    print(f"albedo recovery (CPU, 96^2): {psnr_before:.1f} dB untrained -> {psnr_after:.1f} dB")
    # The threshold measures learning: the untrained (near-grey) material is far below it.
    assert psnr_before < PSNR_TARGET_DB - 5, psnr_before
    assert psnr_after >= PSNR_TARGET_DB, (psnr_before, psnr_after)
    # Other held-out elevations (below and above the training mean) recover too.
    others = [albedo_psnr(after, heldout_cameras(after.cfg, elevation_deg=e)) for e in (-5.0, 40.0)]
    print(f"albedo recovery at elevations -5 / 40: {others[0]:.1f} / {others[1]:.1f} dB")
    assert min(others) >= PSNR_TARGET_DB - 2, others


# ------------------------------------------------------------------------------------------------
# 2. Resume continues exactly
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def deterministic_kernels():
    """The hash-grid reference backward (`table[rows]` -> index_put_ with accumulate) adds its
    gradient rows in thread-dependent order on multi-threaded CPU, so even two straight runs can
    differ by an ulp. Deterministic mode makes that kernel ordered; what is left to test is resume."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous)


@pytest.mark.slow
@pytest.mark.usefixtures("deterministic_kernels")
def test_appearance_resume_is_exact(tmp_path: Path, textured_egg: Path, tiny_sd_path: Path) -> None:
    # Stable Diffusion guidance (tiny model) with strategy 2: the resumed half starts after
    # coarse_iter, so the restored iteration must also pick the right SDS weighting.
    base = {"mode": "appearance_modeling", "text": "a painted egg", "sd_model": str(tiny_sd_path),
            "base_mesh": str(textured_egg), "device": "cpu", "seed": 5, "env_res": 64,
            "train_res": [64, 64], "batch": 1, "iter": 6, "coarse_iter": 2, "save_interval": 3,
            "sds_weight_strategy": 2, "early_time_step_range": [0.02, 0.98],
            "late_time_step_range": [0.02, 0.5], "texture_res": [32, 32], "validate": False,
            "video_frames": 0}
    saved, b, log_a, log_b = check_resume_matches_straight_run(tmp_path, base, stops=[3])
    first = saved[3]
    assert first["optimizer"]["state"]
    # The material actually moved after the resume point (else equality would prove nothing).
    moved = [not torch.equal(x, y) for x, y in zip(first["phase"]["material"].values(),
                                                   b["phase"]["material"].values())]
    assert any(moved)

    for ra, rb in zip(log_a, log_b):
        assert (ra["loss"], ra["azimuth_deg"]) == (rb["loss"], rb["azimuth_deg"]), ra["it"]


# ------------------------------------------------------------------------------------------------
# CUDA: the training G-buffer is made on the cameras' side stream
# ------------------------------------------------------------------------------------------------
