"""Smoke tests of the command-line scripts that no other test runs: each is started as a user would
start it, on small settings, and its output is checked for what it promises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from torch.utils.flop_counter import FlopCounterMode

from geometry.hashgrid import grid_index
from geometry.sdf_init import mesh_signed_distance
from render.light import read_hdr
from scripts.dev.cavity_probe import adam_update, lattice_points, region_of
from scripts.dev.compile_check import stage_tflop
from scripts.make_reference_meshes import bowl_mesh
from scripts.make_tiny_sd import SD21_BASE, vae_model

REPO = Path(__file__).resolve().parents[1]


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, *args] if args[0].endswith(".py") else ["bash", *args]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_make_default_env_writes_a_readable_hdr_sky(tmp_path: Path) -> None:
    out = tmp_path / "sky.hdr"
    proc = run_script("scripts/make_default_env.py", "--out", str(out), "--height", "16")
    assert proc.returncode == 0, proc.stderr
    sky = read_hdr(out)                                          # [16, 32, 3] linear radiance
    assert sky.shape == (16, 32, 3) and np.isfinite(sky).all() and sky.min() > 0
    assert sky[:4].mean() > sky[-4:].mean()                      # brighter sky above the floor


def test_gpu_check_sealed_air_finds_the_void_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "sealed.json"
    proc = run_script("scripts/dev/gpu_check_sealed_air.py", "--device", "cpu", "--grids", "64",
                      "--iters", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    grid = json.loads(out.read_text())["grids"][0]
    assert grid["matches_cpu"] and grid["sealed_is_the_void"] and grid["sealed"] > 0, grid


def test_unwrap_pieces_reports_both_ways(tmp_path: Path) -> None:
    mesh = tmp_path / "sphere.ply"
    trimesh.creation.icosphere(subdivisions=2).export(mesh)
    out = tmp_path / "unwrap.json"
    proc = run_script("scripts/dev/unwrap_pieces.py", str(out), str(mesh))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [r["max_chunk_faces"] for r in rows] == [10_000, 0]
    assert all(r["faces"] == 320 and r["charts"] >= 1 and 0 < r["uv_area_fraction"] <= 1 for r in rows), rows


# Stands in for train.py in full_scale_quality.sh: records its arguments, "recovers" the target
# exactly (its mesh is the target's), and fails for seed 13, as a crashed run would.
FAKE_TRAIN = """
import json, shutil, sys
from pathlib import Path
kv = dict(a.split("=", 1) for a in sys.argv[2:] if "=" in a)
run = Path(kv["out_dir"])
(run / "dmtet_mesh").mkdir(parents=True)
(run / "argv.json").write_text(json.dumps(sys.argv[1:]))
if kv.get("seed") == "13":
    sys.exit("run crashed")
shutil.copy(kv["target_mesh"], run / "dmtet_mesh" / "mesh.obj")
(run / "log.jsonl").write_text("".join(json.dumps({"it": i, "stage": "geometry_coarse", "ms": 10.0 + i}) + "\\n"
                                       for i in (1, 2, 3)))
"""


def test_full_scale_quality_rejects_an_unknown_job_before_running_any(tmp_path: Path) -> None:
    env = {**os.environ, "REFS": str(tmp_path / "refs"), "RUNS": str(tmp_path / "runs")}
    proc = subprocess.run(["bash", "scripts/dev/full_scale_quality.sh", str(tmp_path / "out"), "grid128_bowl_e8@7",
                           "grid128_teapot"], cwd=REPO, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 2 and "unknown job grid128_teapot" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())              # nothing built, nothing run, no output folder


def test_full_scale_quality_runs_jobs_in_parallel_with_seeds_and_grids(tmp_path: Path) -> None:
    """Three jobs two at a time through a stand-in for train.py: seeds, emulated GPUs and a custom-mesh
    job's grid reach the command line; each finished job's summary holds its eval against the right
    reference; the crashed one is named and makes the exit status 1 without stopping the others."""
    fake = tmp_path / "fake_train.py"
    fake.write_text(FAKE_TRAIN)
    refs, runs, out = tmp_path / "refs", tmp_path / "runs", tmp_path / "out"
    env = {**os.environ, "REFS": str(refs), "RUNS": str(runs), "PARALLEL": "2", "LAUNCH": f"{sys.executable} {fake}",
           "EVAL_ARGS": "--images none --samples 4000 --iou-resolution 48"}   # a fraction of the default cost
    jobs = ["grid256_bowl_e8@7", "custom256_torus@3", "grid128_torus@13"]
    proc = subprocess.run(["bash", "scripts/dev/full_scale_quality.sh", str(out), *jobs], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 1 and "grid128_torus@13 failed" in proc.stderr, proc.stderr
    argv = {j: json.loads((runs / j / "argv.json").read_text()) for j in jobs}
    assert {"--config", "configs/car_geometry.json", "dmtet_grid=256", "seed=7", "emulate_gpus=8",
            f"target_mesh={refs}/bowl.obj", "guidance=target_mesh"} <= set(argv[jobs[0]])
    assert {"configs/user_mesh_geometry.json", f"base_mesh={refs}/coarse/torus.obj", "dmtet_grid=256",
            "seed=3"} <= set(argv[jobs[1]])
    assert not any(a.startswith("emulate_gpus") for a in argv[jobs[1]])
    assert sorted(p.name for p in out.iterdir()) == [f"eval_{j}.json" for j in sorted(jobs[:2])]
    for job, ref in zip(jobs[:2], ("bowl", "torus")):
        summary = json.loads((out / f"eval_{job}.json").read_text())
        assert summary["eval"]["reference"] == f"{refs}/{ref}.obj" and summary["eval"]["iou"] > 0.999
        assert summary["iterations"] == 3 and summary["median_ms"] == {"geometry_coarse": 12.0}
        assert "seed=" in summary["command"]


@pytest.mark.parametrize("script", ["scripts/dev/full_scale_quality.sh", "scripts/dev/readme_figures.sh",
                                    "scripts/dev/ab_bench.sh"])
def test_shell_scripts_parse(script: str) -> None:
    proc = subprocess.run(["bash", "-n", script], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_gpu_check_raster_smoke_on_cpu(tmp_path: Path) -> None:
    """Without nvdiffrast the check compares the torch backend with itself: it must pass and time it."""
    out = tmp_path / "raster.json"
    proc = run_script("scripts/dev/gpu_check_raster.py", "--device", "cpu", "--reference", "torch",
                      "--resolution", "64", "--timing-faces", "5000", "--timing-batch", "2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert result["all_pass"] and len(result["parity"]) == 3 and result["timing"][0]["median_ms"] > 0, result


def test_gpu_check_shading_times_the_path_on_cpu(tmp_path: Path) -> None:
    out = tmp_path / "shading.json"
    proc = run_script("scripts/dev/gpu_check_shading.py", "--device", "cpu", "--batch", "1", "--res", "32",
                      "--cube-res", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    assert "skipped" in str(result["texture_parity"]) and result["shading"]["covered_pixels"] > 0, result


def test_compile_check_reports_every_stage_on_cpu(tmp_path: Path, tiny_sd_path: Path) -> None:
    """aot_eager: the script's measurement and parity plumbing without inductor's minutes of C++ compiling."""
    proc = run_script("scripts/dev/compile_check.py", "--device", "cpu", "--sd-model", str(tiny_sd_path),
                      "--resolution", "64", "--batch", "2", "--backend", "aot_eager", "--iters", "1", "--warmup", "0",
                      "--draws", "2", "--profile", "3", "--flops", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "compile_check.json").read_text())
    assert list(result["stages"]) == ["coarse", "fine", "appearance"]
    for row in result["stages"].values():
        assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["parity"]["cos_min"] > 0.999999, row
        eager = row["profile"]["eager"]     # the largest operators, largest first; convolutions among them
        assert len(eager["top"]) == 3 and eager["top"][0]["ms"] >= eager["top"][-1]["ms"] > 0, eager
        assert eager["by_kind"].get("conv/gemm", 0) > 0, eager
        assert row["compiled_tflop_per_s"] > 0, row
    stages = result["stages"]
    assert stages["fine"]["tflop"] > stages["coarse"]["tflop"] > 0, stages     # fine adds the VAE encoder
    assert result["stages"]["coarse"]["compile_s"] > 0 and result["stages"]["fine"]["compile_s"] > 0   # UNet, VAE
    assert proc.stdout.splitlines()[-1].startswith("appearance ")      # the table comes last


def test_stage_flop_count_has_no_weight_gradients() -> None:
    """The fine stage's count is the CFG UNet plus the VAE encoder's forward and its backward to the
    image only: with frozen weights that backward costs what the forward does, so the VAE's share is
    twice its forward, and appearance's UNet and VAE scale with its batch."""
    coarse, fine, appearance = (stage_tflop(n, b, 512) for n, b in (("coarse", 4), ("fine", 4), ("appearance", 3)))
    with torch.device("meta"):
        vae = vae_model(SD21_BASE).half()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vae.encode(torch.zeros(4, 3, 512, 512, device="meta", dtype=torch.half))
    vae_fwd = counter.get_total_flops() / 1e12
    assert (fine - coarse) / vae_fwd == pytest.approx(2.0, rel=0.02), (fine, coarse, vae_fwd)
    assert appearance / fine == pytest.approx(0.75, rel=1e-6), (appearance, fine)


def test_froth_restoring_smoke_on_cpu(tmp_path: Path) -> None:
    """A froth of single-cell blobs in a bowl's hollow raises every stage's loss, shrinking it lowers
    the loss (finite difference), both silhouette methods' gradients push the blobs out, and on the
    unpooled images the walk carries more of that push than nvdiffrast's pixel method."""
    target, out = tmp_path / "bowl.obj", tmp_path / "froth.json"
    bowl_mesh(resolution=48).export(target)
    proc = run_script("scripts/dev/froth_restoring.py", str(target), "--grids", "64", "--res", "128", "--views", "2",
                      "--froth", "0.2", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = json.loads(out.read_text())["grids"]
    assert row["froth_vertices"] > 20, row
    for name, st in row["stages"].items():
        assert st["excess_loss"] > 0 and st["fd_restoring"] < 0, (name, st)
        assert st["pixel"]["analytic_restoring"] < 0 and st["walk"]["analytic_restoring"] < 0, (name, st)
    pixels = row["stages"]["pixels"]
    assert pixels["pixel"]["captured"] < pixels["walk"]["captured"], pixels


def test_silhouette_check_smoke_on_cpu(tmp_path: Path) -> None:
    """Small icospheres and a grid-32 DMTet surface: the walk's gradient accounts for the silhouette's
    motion, nvdiffrast's method for at most about half of it; both are timed."""
    out = tmp_path / "silhouette.json"
    proc = run_script("scripts/dev/silhouette_check.py", "--device", "cpu", "--smoke", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert len(cases) == 3 and all(0.9 <= c["walk_torch"]["ratio"] <= 1.1 and c["pixel"]["ratio"] < 0.6
                                   for c in cases), cases
    assert all(1 <= c["longest_walk"] <= result["max_steps"] for c in cases), cases
    assert result["timing"]["pixel"]["median_ms"] > 0 and result["timing"]["walk_torch"]["median_ms"] > 0


GPU_SCRIPTS = ("scripts/dev/pretraining_fit.py", "scripts/dev/cup_null_space.py", "scripts/dev/host_window.py",
               "scripts/dev/fingerprint.py")

# Each script run as `python SCRIPT --help` would run it (runpy as __main__), all in one process:
# torch and the project load once instead of once per script.
HELP_DRIVER = """
import contextlib, io, runpy, sys
for script in sys.argv[1:]:
    sys.argv = [script, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(script, run_name="__main__")
        code = "no exit"
    except SystemExit as e:
        code = e.code
    print(f"{script} exit={code} usage={'usage' in out.getvalue().lower()}")
"""


def test_gpu_scripts_import_and_explain_themselves() -> None:
    """Scripts whose real run needs a GPU or tens of minutes: their imports resolve and --help works."""
    proc = subprocess.run([sys.executable, "-c", HELP_DRIVER, *GPU_SCRIPTS], cwd=REPO, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [f"{s} exit=0 usage=True" for s in GPU_SCRIPTS], proc.stdout + proc.stderr


def test_cavity_probe_places_rows_regions_and_updates() -> None:
    """The probe's three readings: a dense level's row r sits where the encoder reads row r; a bowl's
    hollow is `cavity`, its wall `solid`, the space beside it `open`; the update it reports is
    AdamW's own step in units of the learning rate."""
    aabb = np.array([[-1.0, -2.0, 0.0], [1.0, 2.0, 3.0]])
    ijk = torch.tensor([[0, 0, 0], [3, 1, 2], [1, 3, 3]])
    rows = grid_index(ijk, 3, True, 0).numpy()
    want = aabb[0] + ijk.numpy() / 3.0 * (aabb[1] - aabb[0])
    assert np.allclose(lattice_points(3, aabb)[rows], want)

    bowl = bowl_mesh(resolution=48)
    v, f = np.asarray(bowl.vertices, np.float64), np.asarray(bowl.faces, np.int64)
    lo, hi = v.min(0), v.max(0)
    centre = (lo + hi) / 2
    grid = lattice_points(24, np.stack([lo, hi]))
    inside_wall = grid[np.argmin(mesh_signed_distance(grid, v, f))]     # the deepest point of the wall
    points = np.stack([np.array([centre[0], hi[1] - 0.05, centre[2]]),   # in the hollow, below the rim
                       inside_wall, np.array([hi[0] + 0.5, centre[1], centre[2]])])
    assert region_of(points, v, f, cell=0.01).tolist() == [1, 0, 2]

    p = torch.nn.Parameter(torch.zeros(5))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.9, 0.99), eps=1e-15, weight_decay=0.0)
    for g in (1.0, -0.5, 2.0):
        p.grad = torch.full((5,), g)
        before = p.detach().clone()
        opt.step()
    upd, rms = adam_update(opt.state[p], (0.1, 1e-15), (0.9, 0.99))
    assert torch.allclose(upd * 0.1, (p.detach() - before).abs(), rtol=1e-5)
