"""The web app's parts without a browser or gradio: which configs it offers, the train.py command
lines it builds, what it refuses from the form and in uploads, and its run queue."""
from __future__ import annotations

import json
import struct
import sys
import time
from pathlib import Path

import pytest

from webapp.jobs import Job, JobQueue, JobState, OutputTail, latest_validation
from webapp.plan import RequestError, RunRequest, ServerSettings, Step, plan_steps
from webapp.recipes import shipped_recipes
from webapp.uploads import STORED_NAME, UploadError, UploadLimits, accept_upload

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {r.label: r for r in shipped_recipes()}
TINY_PAIR = "tiny_cpu_geometry.json -> tiny_cpu_appearance.json"


def overrides(step: Step) -> dict:
    return dict((k, json.loads(v)) for k, v in (o.split("=", 1) for o in step.overrides))


def test_every_shipped_config_and_each_geometry_appearance_pair_is_offered() -> None:
    assert {p.name for p in (ROOT / "configs").glob("*.json")} <= set(RECIPES)
    assert {TINY_PAIR, "car_geometry.json -> car_appearance_strategy0.json",
            "pineapple_geometry_single_gpu.json -> pineapple_appearance_strategy2_single_gpu.json"} <= set(RECIPES)
    assert RECIPES[TINY_PAIR].modes == ("geometry_modeling", "appearance_modeling")


def test_a_sequence_textures_the_mesh_its_geometry_step_writes(tmp_path: Path) -> None:
    server = ServerSettings(tmp_path / "runs", sd_model="tiny", device="cpu")
    req = RunRequest(TINY_PAIR, prompt="a blue vase", seed=3, iterations=4, grid=16, extra="sdf_init_iter=5")
    geometry, appearance = plan_steps(req, RECIPES[TINY_PAIR], tmp_path / "runs" / "job", server)
    g, a = overrides(geometry), overrides(appearance)
    assert g["out_dir"] == str(tmp_path / "runs" / "job" / "geometry") and g["dmtet_grid"] == 16
    assert (g["iter"], g["coarse_iter"], a["iter"], a["coarse_iter"]) == (4, 2, 4, 1)   # each config's split
    assert a["base_mesh"] == str(tmp_path / "runs" / "job" / "geometry" / "dmtet_mesh" / "mesh.obj")
    assert "dmtet_grid" not in a and g["text"] == a["text"] == "a blue vase" and g["sdf_init_iter"] == 5
    assert g["sd_model"] == a["sd_model"] == "tiny" and g["device"] == "cpu"
    assert geometry.command("python")[:4] == ["python", "-u", "train.py", "--config"]


def test_an_upload_is_fine_tuned_by_geometry_and_textured_by_appearance(tmp_path: Path) -> None:
    server, mesh = ServerSettings(tmp_path), tmp_path / "input_mesh.obj"
    geometry = plan_steps(RunRequest("tiny_cpu_geometry.json", mesh=mesh), RECIPES["tiny_cpu_geometry.json"],
                          tmp_path / "a", server)[0]
    appearance = plan_steps(RunRequest("tiny_cpu_appearance.json", mesh=mesh), RECIPES["tiny_cpu_appearance.json"],
                            tmp_path / "b", server)[0]
    assert overrides(geometry)["sdf_init_shape"] == "custom_mesh" and overrides(geometry)["base_mesh"] == str(mesh)
    assert overrides(appearance)["base_mesh"] == str(mesh)


@pytest.mark.parametrize("line", ["out_dir=/tmp/elsewhere", "base_mesh=/etc/passwd", "envmap=sky.hdr",
                                  "resume=auto", "sd_model=other/model", 'display=[{"relight": "x.hdr"}]',
                                  "target_mesh=a.obj", "device=cuda", "mode=appearance_modeling"])
def test_path_like_and_app_set_keys_are_refused(tmp_path: Path, line: str) -> None:
    req = RunRequest("tiny_cpu_geometry.json", extra=f"batch=1\n{line}")
    with pytest.raises(RequestError, match=rf"^refused: '{line.split('=')[0]}'"):
        plan_steps(req, RECIPES["tiny_cpu_geometry.json"], tmp_path, ServerSettings(tmp_path))


@pytest.mark.parametrize("extra, message", [("bach=2", "did you mean 'batch'"), ("batch", "expected key=value"),
                                            ("iter=0", "invalid value for 'iter'")])
def test_bad_keys_get_the_config_errors_message(tmp_path: Path, extra: str, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        plan_steps(RunRequest("tiny_cpu_geometry.json", extra=extra), RECIPES["tiny_cpu_geometry.json"], tmp_path,
                   ServerSettings(tmp_path))


# ------------------------------------------------------------------------------------------------
# Uploads
# ------------------------------------------------------------------------------------------------
TRIANGLE = b"mtllib ../../secret.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n"


def test_a_good_upload_is_stored_under_a_fixed_name_without_material_files(tmp_path: Path) -> None:
    src = tmp_path / "My Mesh (1).OBJ"
    src.write_bytes(TRIANGLE)
    stored = accept_upload(src, tmp_path / "job", UploadLimits())
    assert stored == tmp_path / "job" / f"{STORED_NAME}.obj"
    assert b"mtllib" not in stored.read_bytes() and b"f 1 2 3" in stored.read_bytes()


def _glb_with_external_image(path: Path) -> None:
    doc = json.dumps({"asset": {"version": "2.0"}, "images": [{"uri": "../../server/file.png"}]}).encode()
    doc += b" " * (-len(doc) % 4)
    path.write_bytes(b"glTF" + struct.pack("<II", 2, 20 + len(doc)) + struct.pack("<II", len(doc), 0x4E4F534A) + doc)


@pytest.mark.parametrize("name, content, message", [
    ("empty.obj", b"", "refused upload: mesh file 'empty.obj' contains no triangle faces"),
    ("notes.txt", TRIANGLE, "expected a mesh file"),
    ("big.obj", TRIANGLE + b"#" * 2**20, "over the 1 MB limit"),
    ("ext.glb", None, "refers to external files"),
], ids=["empty", "type", "size", "external"])
def test_bad_uploads_are_refused(tmp_path: Path, name: str, content: bytes | None, message: str) -> None:
    src = tmp_path / name
    _glb_with_external_image(src) if content is None else src.write_bytes(content)
    with pytest.raises(UploadError, match=message) as refused:
        accept_upload(src, tmp_path / "job", UploadLimits(max_mb=1))
    assert str(tmp_path) not in str(refused.value)     # the message names the upload, not server paths


# ------------------------------------------------------------------------------------------------
# The queue
# ------------------------------------------------------------------------------------------------
def _job(tmp_path: Path, name: str) -> Job:
    return Job(steps=[Step("geometry", Path("x.json"), (name,), tmp_path / name)], folder=tmp_path / name)


def _wait(condition, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


def test_one_run_at_a_time_and_later_jobs_see_their_place(tmp_path: Path) -> None:
    gate = tmp_path / "go"
    # A stand-in for train.py: waits for the gate, then fails for job "c" with a project-style error.
    script = ("import pathlib, sys, time\nwhile not pathlib.Path(sys.argv[1]).exists(): time.sleep(0.05)\n"
              "if sys.argv[2] == 'c':\n    print('loading...'); print('error: the shape vanished', file=sys.stderr)"
              "; sys.exit(1)\n")
    queue = JobQueue([None], command=lambda step: [sys.executable, "-c", script, str(gate), step.overrides[0]])
    a, b, c = (_job(tmp_path, n) for n in "abc")
    assert [queue.submit(j) for j in (a, b, c)] == [1, 2, 3]
    _wait(lambda: a.state is JobState.RUNNING)
    assert (queue.position(a), queue.position(b), queue.position(c)) == (0, 1, 2)
    gate.touch()
    _wait(lambda: c.done)
    assert a.state is b.state is JobState.FINISHED
    assert c.state is JobState.FAILED and c.error == "error: the shape vanished"
    assert "loading..." in (tmp_path / "c" / "geometry.log").read_text()
    queue.shutdown()


def test_output_tail_reads_progress_bars_and_the_error_line() -> None:
    tail = OutputTail()
    tail.feed("SDF pretraining:  10%|#\rSDF pretraining:  20%|##")
    assert tail.last_line() == "SDF pretraining:  20%|##"
    tail.feed("\nerror: first\nwarning: x\nerror: last one\ntraceback")
    assert tail.error_line() == "error: last one"


def test_latest_validation_prefers_the_newest_main_image(tmp_path: Path) -> None:
    for name in ("it000010_normal", "it000020_kd", "it000020_shaded", "it000020_ks"):
        (tmp_path / "validation").mkdir(exist_ok=True)
        (tmp_path / "validation" / f"{name}.png").write_bytes(b"")
    assert latest_validation(tmp_path).name == "it000020_shaded.png"
