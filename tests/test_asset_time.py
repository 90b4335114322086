"""Whole-asset wall time: the per-activity accumulator of status.json (run_status.py) and
scripts/asset_time.py, which times a geometry + appearance pair from it."""
from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch

from config import Config, build_config
from dataset.cameras import azimuth_sector, sample_train_cameras
from guidance import registry
from guidance.base import NORMAL_MASK, GuidanceEnv, input_for
from run_status import TIMING_CATEGORIES, RunProgress, RunStatus, stopped_at_once, timing_category
from scripts import asset_time
from trainer import camera_options

ROOT = Path(__file__).resolve().parent.parent
BUNNY = ROOT / "data" / "meshes" / "bunny_like.obj"
CONFIGS = ROOT / "configs"
# The tiny CPU pair, shortened: 50 SDF steps keep the start shape's surface (a sphere of
# mesh_scale 2.1), 4 training steps visit both geometry stages, a save point validates and writes
# a checkpoint, video_frames=0 skips the turntable.
SHORT = ["iter=4", "coarse_iter=2", "sdf_init_iter=50", "mesh_scale=2.1", "sdf_init_shape_scale=[1,1,1]",
         "video_frames=0", "tensorboard=off"]


class FakeClock:
    """A perf_counter the test advances by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _spend(run: RunProgress, clock: FakeClock, activity: str, seconds: float) -> None:
    run.activity = activity
    clock.now += seconds


# ------------------------------------------------------------------------------------------------
# The accumulator
# ------------------------------------------------------------------------------------------------
def test_every_activity_a_run_reports_has_its_category() -> None:
    expected = {"the start": "load", "model loading": "load", "preparation": "load",
                "SDF pretraining": "sdf_pretraining",
                "training iteration 1 (geometry_coarse stage)": "coarse",
                "training iteration 1200 (geometry_fine stage)": "fine",
                "training iteration 7 (appearance stage)": "appearance",
                "validation of iteration 20": "validation", "the checkpoint write of iteration 20": "checkpoints",
                "the export": "export", "the turntable video": "video", "something new": "other"}
    assert {activity: timing_category(activity) for activity in expected} == expected
    assert set(expected.values()) == set(TIMING_CATEGORIES)
    assert set(TIMING_CATEGORIES) <= set(asset_time.ROWS)     # every category has a row in the report


def test_time_is_charged_to_the_activity_that_spent_it() -> None:
    clock = FakeClock()
    run = RunProgress(total=4, clock=clock)
    clock.now += 1.0                                                  # "the start"
    _spend(run, clock, "model loading", 2.0)
    _spend(run, clock, "SDF pretraining", 10.0)
    for it in range(1, 5):
        _spend(run, clock, f"training iteration {it} ({'geometry_coarse' if it <= 2 else 'geometry_fine'} stage)", 0.5)
    _spend(run, clock, "validation of iteration 4", 0.25)
    _spend(run, clock, "the checkpoint write of iteration 4", 0.125)
    _spend(run, clock, "the export", 3.0)
    _spend(run, clock, "the turntable video", 4.0)
    timings = run.timings()
    assert timings == {"load": 3.0, "sdf_pretraining": 10.0, "coarse": 1.0, "fine": 1.0, "validation": 0.25,
                       "checkpoints": 0.125, "export": 3.0, "video": 4.0}
    assert sum(timings.values()) == pytest.approx(clock.now - 100.0)
    clock.now += 1.0
    assert run.timings()["video"] == 5.0                              # the current activity so far


def test_an_interrupted_run_keeps_its_partial_timings(tmp_path: Path) -> None:
    clock = FakeClock()
    run = RunProgress(total=40, clock=clock)
    status = RunStatus(tmp_path / "status.json", enabled=True)
    _spend(run, clock, "model loading", 2.0)
    status.write("running", run, "started")
    _spend(run, clock, "SDF pretraining", 5.0)
    _spend(run, clock, "training iteration 1 (geometry_coarse stage)", 0.5)
    end = stopped_at_once(signal.SIGINT, run)
    status.write(end.state, run, end.message, end.exit_code, end.signum)
    data = json.loads((tmp_path / "status.json").read_text())
    assert data["state"] == "interrupted" and data["activity"].startswith("training iteration 1")
    assert data["timings_s"] == {"load": 2.0, "sdf_pretraining": 5.0, "coarse": 0.5}
    assert data["timing_start_unix_s"] == pytest.approx(time.time(), abs=60)


# ------------------------------------------------------------------------------------------------
# The script's parts
# ------------------------------------------------------------------------------------------------
def _plan(tmp_path: Path, nproc: int = 1, keep: Path | None = None) -> asset_time.Plan:
    return asset_time.Plan(nproc, ["emulate_gpus=8", "out_dir=ignored"], keep, tmp_path)


def test_commands_train_each_phase_as_a_user_would(tmp_path: Path) -> None:
    plain = _plan(tmp_path)
    overrides = asset_time.phase_overrides("appearance", plain, tmp_path / "appearance", tmp_path / "mesh.obj")
    # The user's overrides first, the script's after them (later overrides win).
    assert overrides == ["emulate_gpus=8", "out_dir=ignored", f"out_dir={tmp_path / 'appearance'}",
                         f"base_mesh={tmp_path / 'mesh.obj'}"]
    command = asset_time.phase_command("a.json", overrides, 1, keep_surface=False)
    assert command[:2] == [sys.executable, str(ROOT / "train.py")] and command[2:4] == ["--config", "a.json"]

    kept = _plan(tmp_path, nproc=4, keep=BUNNY)
    overrides = asset_time.phase_overrides("geometry", kept, tmp_path / "geometry", None)
    assert overrides[-2:] == [f"guidance={asset_time.KEEP_SURFACE}", f"target_mesh={BUNNY}"]
    command = asset_time.phase_command("g.json", overrides, 4, keep_surface=True)
    assert command[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=4"]
    assert command[6:8] == [str(ROOT / "scripts" / "asset_time.py"), asset_time.TRAIN_IN_PROCESS]
    # The appearance run keeps the prompt's guidance: its mesh is fixed.
    assert not any(o.startswith("guidance=") for o in asset_time.phase_overrides("appearance", kept, tmp_path, None))


def test_the_rows_of_a_phase_add_up_to_its_wall_time() -> None:
    status = {"timings_s": {"load": 2.0, "coarse": 5.0, "a_new_stage": 1.0}, "timing_start_unix_s": 1003.0}
    rows = asset_time.split(status, launched_unix_s=1000.0, wall_s=12.5)
    assert list(rows) == list(asset_time.ROWS)
    assert (rows["start"], rows["load"], rows["coarse"], rows["other"], rows["exit"]) == (3.0, 2.0, 5.0, 1.0, 1.5)
    assert sum(rows.values()) == pytest.approx(12.5)


def test_missing_files_are_named_before_anything_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = asset_time.main(["--geometry", str(CONFIGS / "tiny_cpu_geometry.json"), "--appearance", "nope.json"])
    assert code == 1 and "--appearance: file not found: nope.json" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# The keep-surface guidance: both guidances' work, the target's gradient
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def keep_surface() -> Iterator[None]:
    registry.register(asset_time.KEEP_SURFACE)(asset_time.build_keep_surface)
    yield
    registry.unregister(asset_time.KEEP_SURFACE)


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def wrap(self, fn: Any) -> Any:
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            return fn(*args, **kwargs)
        return counted


def _target_render(cfg: Config, renders: Counter) -> Any:
    """A stand-in for the phase's target renderer: a constant render in the stage's input format."""
    def render(cams: Any, stage: str) -> torch.Tensor:
        renders.calls += 1
        spec = input_for(stage, cfg)
        if spec.kind == NORMAL_MASK:
            return torch.full((len(cams), 4, spec.size, spec.size), 0.5)
        return torch.full((len(cams), 3, *cams.resolution), 0.5)
    return render


def _render_like(cfg: Config, stage: str) -> torch.Tensor:
    spec = input_for(stage, cfg)
    shape = (1, 4, spec.size, spec.size) if spec.kind == NORMAL_MASK else (1, 3, *cfg.train_res)
    return torch.rand(shape, generator=torch.Generator().manual_seed(3))


@pytest.mark.slow
def test_keep_surface_does_the_diffusion_work_and_follows_the_target(tiny_sd_path: Path, keep_surface: None) -> None:
    cfg = build_config({"mode": "geometry_modeling", "device": "cpu", "sd_model": str(tiny_sd_path),
                        "guidance": asset_time.KEEP_SURFACE, "target_mesh": str(BUNNY), "text": "a red car",
                        "train_res": [64, 64], "batch": 1, "iter": 2, "coarse_iter": 1})
    renders, unet, encoder_backward = Counter(), Counter(), Counter()
    guide = registry.build(GuidanceEnv(cfg, torch.device("cpu"), lambda: _target_render(cfg, renders)))
    model = guide.diffusion.model
    model.predict_eps = unet.wrap(model.predict_eps)
    model.vae.encoder.register_full_backward_hook(lambda *_: setattr(encoder_backward, "calls",
                                                                     encoder_backward.calls + 1))
    cams = sample_train_cameras(1, azimuth_sector(0, 1), camera_options(cfg), torch.Generator().manual_seed(0), "cpu")
    for it, stage in ((1, "geometry_coarse"), (2, "geometry_fine")):
        x = _render_like(cfg, stage).requires_grad_(True)
        draw = guide.draw(stage, it, cams, torch.Generator().manual_seed(it))
        result = guide.sds(x, stage, it, cams, torch.Generator().manual_seed(10 + it), draw)
        result.loss.backward()
        alone = x.detach().clone().requires_grad_(True)            # the target guidance by itself
        expected = guide.target.sds(alone, stage, it, cams, None, draw.target)
        expected.loss.backward()
        assert torch.equal(x.grad, alone.grad), stage              # the surface follows the target only
        assert torch.equal(result.stats, expected.stats)           # and the log shows the target's loss
    assert unet.calls == 2                                         # the UNet ran in both stages,
    assert encoder_backward.calls == 1                             # the VAE encoder's backward in the fine one
    assert renders.calls == 4                                      # the target: 2 steps + 2 comparisons


# ------------------------------------------------------------------------------------------------
# The script on the tiny CPU pair
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_asset_time_on_the_tiny_pair(tmp_path: Path, tiny_sd_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))       # the run folders go under tmp_path
    out = tmp_path / "asset.json"
    t0 = time.perf_counter()
    code = asset_time.main(["--geometry", str(CONFIGS / "tiny_cpu_geometry.json"),
                            "--appearance", str(CONFIGS / "tiny_cpu_appearance.json"), "--sd-model", str(tiny_sd_path),
                            "--keep-surface", str(BUNNY), "--keep", "--out", str(out), "--", *SHORT])
    measured = time.perf_counter() - t0
    assert code == 0
    result = json.loads(out.read_text())
    phases = result["phases"]
    for name, p in phases.items():
        assert list(p["seconds"]) == list(asset_time.ROWS), name       # every row, zero or not
        assert sum(p["seconds"].values()) == pytest.approx(p["wall_s"], rel=0.01), name
        assert p["state"] == "finished" and p["seconds"]["start"] > 0 and p["seconds"]["exit"] >= 0, name
        _assert_status_covers_the_run(Path(result["run_folders"]) / name)
    for row in ("load", "sdf_pretraining", "coarse", "fine", "validation", "checkpoints", "export"):
        assert phases["geometry"]["seconds"][row] > 0, row
    assert phases["appearance"]["seconds"]["appearance"] > 0 and phases["appearance"]["seconds"]["coarse"] == 0
    assert result["asset"]["seconds"]["video"] == 0                    # video_frames=0
    # The phases' walls are the whole asset: the script adds little around them.
    assert result["asset"]["wall_s"] == pytest.approx(sum(p["wall_s"] for p in phases.values()))
    assert result["asset"]["wall_s"] <= measured <= result["asset"]["wall_s"] * 1.05 + 1.0
    geometry = json.loads((Path(result["run_folders"]) / "geometry" / "config.json").read_text())
    assert geometry["guidance"] == asset_time.KEEP_SURFACE and geometry["target_mesh"] == str(BUNNY)


def _assert_status_covers_the_run(run_dir: Path) -> None:
    """The accumulator has no gaps: its categories add up to the time from its start to the last
    status write (the file's modification time)."""
    status_file = run_dir / "status.json"
    status = json.loads(status_file.read_text())
    span = os.stat(status_file).st_mtime - status["timing_start_unix_s"]
    assert sum(status["timings_s"].values()) == pytest.approx(span, rel=0.02, abs=0.05), run_dir
