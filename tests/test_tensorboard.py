"""TensorBoard view of a run (tb_log.py): event files read back with TensorBoard's own reader hold
exactly log.jsonl's numbers, the validation images, turntable frames and the mesh; tensorboard=on
without the package stops at config time; off writes nothing."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import trimesh
from PIL import Image

import tb_log
from config import ConfigError
from tests.run_helpers import read_log, run_train, write_config

pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install -r requirements.txt)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.util import tensor_util  # noqa: E402

# Two iterations (coarse, fine), a save point at each, a 3-frame turntable. The SDF pretraining of
# this shape and seed is the shortest that leaves a surface on the 32 grid.
TINY: dict[str, Any] = {
    "mode": "geometry_modeling", "text": "a cup", "device": "cpu", "seed": 7, "dmtet_grid": 32,
    "train_res": [64, 64], "batch": 1, "iter": 2, "coarse_iter": 1, "save_interval": 1, "sdf_init_iter": 60,
    "video_frames": 3, "display": [{"bsdf": "normal"}],
}
SIZES = {"scalars": 0, "images": 0, "tensors": 0, "histograms": 0}   # 0: keep every event


def events(folder: Path):
    """Every event under `folder`, through TensorBoard's own reader."""
    acc = EventAccumulator(str(folder), size_guidance=SIZES)
    acc.Reload()
    return acc


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Path:
    folder = tmp_path_factory.mktemp("tb")
    run_dir = folder / "run"
    cfg = write_config(folder, {**TINY, "sd_model": str(tiny_sd_path), "out_dir": str(run_dir)})
    assert run_train(cfg, "tensorboard=on") == 0
    return run_dir


@pytest.mark.slow
def test_scalars_equal_the_log(tb_run: Path) -> None:
    acc = events(tb_run / "tensorboard")
    records = read_log(tb_run)
    numeric = {k for r in records for k, v in r.items() if k != "it" and isinstance(v, (int, float))}
    assert {"loss", "ms", "nonfinite", "skipped", "faces"} <= numeric
    assert set(acc.Tags()["scalars"]) == numeric
    for key in numeric:
        logged = [(r["it"], np.float32(float(r[key]))) for r in records if key in r]
        assert [(e.step, np.float32(e.value)) for e in acc.Scalars(key)] == logged, key
    # Lists of numbers (every rank's azimuths, parameter checksums) go in as histograms.
    assert {"azimuth_deg", "param_checksum"} <= set(acc.Tags()["histograms"])


@pytest.mark.slow
def test_images_turntable_and_mesh(tb_run: Path) -> None:
    acc = events(tb_run / "tensorboard")
    shots = acc.Images("validation/normal")
    assert [s.step for s in shots] == [1, 2]
    png = iio.imread(tb_run / "validation" / "it000002_normal.png")
    assert np.array_equal(iio.imread(shots[-1].encoded_image_string), png)   # the same grid as the PNG
    turntable = acc.Images("turntable")
    assert [t.step for t in turntable] == [2] and turntable[0].width > 0

    tags = acc.Tags()["tensors"]
    assert {"mesh_VERTEX", "mesh_FACE", "mesh_COLOR"} <= set(tags)
    assert acc.SummaryMetadata("mesh_VERTEX").plugin_data.plugin_name == "mesh"
    vertices = tensor_util.make_ndarray(acc.Tensors("mesh_VERTEX")[-1].tensor_proto)[0]
    faces = tensor_util.make_ndarray(acc.Tensors("mesh_FACE")[-1].tensor_proto)[0]
    exported = trimesh.load(tb_run / "dmtet_mesh" / "mesh.glb", force="mesh", process=False)
    assert vertices.shape == exported.vertices.shape and faces.shape == exported.faces.shape
    assert np.allclose(vertices, exported.vertices, atol=1e-6)


def test_on_without_the_package_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)     # `import tensorboard` now fails
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, {**TINY, "out_dir": str(run_dir)})
    assert run_train(cfg, "tensorboard=on") == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: tensorboard=on needs the tensorboard package"), err
    assert not run_dir.exists()                                  # stopped before the run folder


def test_unimportable_package_is_skipped_by_auto_and_an_error_for_on(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb_log, "SummaryWriter", None)          # as when torch's import of it failed
    monkeypatch.setattr(tb_log, "_import_error", ImportError("No module named 'tensorboard'"))
    run_dir = tmp_path / "run"
    assert not tb_log.enabled("auto") and not tb_log.open_for_run("auto", run_dir).active
    with pytest.raises(ConfigError, match=r"^tensorboard=on needs the tensorboard package.*No module named"):
        tb_log.open_for_run("on", run_dir)
    assert not tb_log.open_for_run("on", run_dir, is_main=False).active      # rank > 0 writes nothing anyway
    assert not run_dir.exists()


def test_auto_says_where_the_logs_go(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    log = tb_log.open_for_run("auto", tmp_path / "run")
    assert log.active and log.log_dir == tmp_path / "run" / "tensorboard"
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and str(tmp_path / "run" / "tensorboard") in out
    assert not tb_log.open_for_run("auto", tmp_path / "other", is_main=False).active   # rank > 0


def test_textured_mesh_shows_its_albedo(tmp_path: Path) -> None:
    quad = trimesh.Trimesh(vertices=[[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], faces=[[0, 1, 2], [0, 2, 3]],
                           process=False)
    red = Image.new("RGB", (8, 8), (200, 10, 10))
    quad.visual = trimesh.visual.TextureVisuals(uv=[[0, 0], [1, 0], [1, 1], [0, 1]], image=red)
    quad.export(tmp_path / "mesh.glb")
    log = tb_log.TensorBoardLog(tmp_path / "tb")
    log.log_mesh(1, [tmp_path / "mesh.glb"])
    log.close()
    colors = tensor_util.make_ndarray(events(tmp_path / "tb").Tensors("mesh_COLOR")[0].tensor_proto)[0]
    assert np.abs(colors - [200, 10, 10]).max() <= 1


@pytest.mark.slow
def test_off_writes_no_event_files(tmp_path: Path, tiny_sd_path: Path) -> None:
    # An appearance run: no SDF pretraining, so the cheapest complete run.
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path, {
        "mode": "appearance_modeling", "text": "a red cup", "device": "cpu", "base_mesh": "data/meshes/bunny_like.obj",
        "sd_model": str(tiny_sd_path), "out_dir": str(run_dir), "iter": 1, "coarse_iter": 0, "save_interval": 1,
        "train_res": [64, 64], "texture_res": [64, 64], "env_res": 64, "video_frames": 0})
    assert run_train(cfg, "tensorboard=off") == 0
    assert (run_dir / "log.jsonl").is_file() and (run_dir / "dmtet_mesh" / "mesh.glb").is_file()
    assert not (run_dir / "tensorboard").exists()
    assert not list(run_dir.rglob("events.out.tfevents*"))
