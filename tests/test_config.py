"""Config schema and CLI: published configs accepted, bad input rejected with exit code 2."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import config as C

from tests.run_helpers import PUBLISHED_CONFIGS

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def write(tmp_path, data, name="cfg.json"):
    p = tmp_path / name
    p.write_text(json.dumps(data))
    return p


BASE = {"text": "a red car", "iter": 10, "coarse_iter": 5}


def test_published_configs_present():
    assert len(PUBLISHED_CONFIGS) == 72, "expected the 72 published configs in tests/data/published_configs.json"


@pytest.mark.parametrize("name", sorted(PUBLISHED_CONFIGS))
def test_published_config_accepted(name):
    """Every key accepted with its value; only files the config names may be missing."""
    data = PUBLISHED_CONFIGS[name]
    try:
        cfg = C.build_config(data, file_name=f"{name}.json")
    except C.ConfigError as e:  # pragma: no cover - the assertion message is the point
        pytest.fail(f"{name}.json: {e}")
    for key, value in data.items():
        got = getattr(cfg, key)
        assert got == value or (isinstance(value, list) and got == [float(v) if isinstance(g, float) else v
                                                                    for v, g in zip(value, got)]), key
    try:
        C.check_files(cfg)
    except C.ConfigError as e:
        msg = str(e)
        assert msg.startswith("file not found for '"), msg
        named = re.search(r"': (\S+) \(looked in", msg).group(1)
        assert named in data.values(), msg


def test_published_semantics_defaults():
    cfg = C.Config(text="x")
    assert cfg.iter == 5000 and cfg.batch == 1 and cfg.train_res == [512, 512]
    assert cfg.dmtet_grid == 64 and cfg.mesh_scale == 2.1 and cfg.guidance_weight == 100
    assert cfg.ks_min == [0.0, 0.08, 0.0] and cfg.nrm_min == [-1.0, -1.0, 0.0]
    assert cfg.cam_near_far == [1, 50] and cfg.front_threshold == 45 and cfg.if_use_bump is True
    assert cfg.early_time_step_range == [0.02, 0.5] and cfg.sd_model == C.DEFAULT_SD_MODEL


def test_check_prints_resolved_config(tmp_path):
    p = write(tmp_path, {**BASE, "batch": 2})
    r = run_cli("--config", str(p), "--check")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["batch"] == 2 and out["text"] == "a red car" and out["dmtet_grid"] == 64
    assert set(out) == set(C.FIELDS)


def test_cli_beats_file(tmp_path):
    p = write(tmp_path, {**BASE, "batch": 2, "validate": True})
    r = run_cli("--config", str(p), "--check", "batch=4", "train_res=[256,256]", 'text="a blue car"',
                "validate=false", "out_dir=runs/x")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["batch"] == 4 and out["train_res"] == [256, 256] and out["text"] == "a blue car"
    assert out["validate"] is False and out["out_dir"] == "runs/x"


def test_override_plain_string(tmp_path):
    key, value = C.parse_override("text=a red car")
    assert (key, value) == ("text", "a red car")
    assert C.parse_override("batch=4") == ("batch", 4)


@pytest.mark.parametrize("data,cli,pattern", [
    ({"guidance_wieght": 3}, [], r"unknown config key 'guidance_wieght' in cfg.json; did you mean 'guidance_weight'\?"),
    ({}, ["guidance_wieght=3"], r"unknown config key 'guidance_wieght' in the command line; did you mean 'guidance_weight'"),
    ({"batch": "four"}, [], r"'batch' in cfg.json: expected an integer >= 1, got \"four\""),
    ({"train_res": [512]}, [], r"'train_res'.*expected a list of 2 positive integers, got \[512\]"),
    ({"iter": -5}, [], r"'iter'.*expected an integer >= 1, got -5"),
    ({"mode": "geometry"}, [], r"'mode'.*expected one of \"geometry_modeling\", \"appearance_modeling\", got \"geometry\""),
    ({"sds_weight_strategy": 3}, [], r"'sds_weight_strategy'.*expected one of 0, 1, 2, got 3"),
    ({"validate": 1}, [], r"'validate'.*expected true or false, got 1"),
    ({"early_time_step_range": [0.6, 0.2]}, [], r"'early_time_step_range'.*first <= second"),
    ({"elevation_range": [-100, 45]}, [], r"'elevation_range'.*\[-90"),
])
def test_bad_input_rejected(tmp_path, data, cli, pattern):
    p = write(tmp_path, {**BASE, **data})
    r = run_cli("--config", str(p), "--check", *cli)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and re.search(pattern, lines[0]), r.stderr
    assert r.stdout == ""


def test_missing_config_file(tmp_path):
    r = run_cli("--config", str(tmp_path / "nope.json"), "--check")
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr


def test_not_json(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{ nope")
    r = run_cli("--config", str(p), "--check")
    assert r.returncode == 2 and "not valid JSON" in r.stderr


def test_missing_file_named(tmp_path):
    p = write(tmp_path, {**BASE, "mode": "appearance_modeling", "base_mesh": "out/none/dmtet_mesh/mesh.obj"})
    r = run_cli("--config", str(p), "--check")
    assert r.returncode == 2 and "out/none/dmtet_mesh/mesh.obj" in r.stderr


def test_relative_out_dir_under_out(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert C.Config(text="x", out_dir="car").run_dir() == tmp_path / "out" / "car"
    assert C.Config(text="x", out_dir=str(tmp_path / "abs")).run_dir() == tmp_path / "abs"


def test_requirements_match_environment():
    """pip and conda users get the same packages."""
    def names(lines):
        out = set()
        for line in lines:
            line = line.split("#")[0].strip().lstrip("- ").strip()
            if line and not line.endswith(":") and line not in ("pip", "python=3.11"):
                out.add(re.split(r"[<>=!~ ;]", line)[0].lower())
        return out
    req = names((ROOT / "requirements.txt").read_text().splitlines())
    env_lines = (ROOT / "environment.yml").read_text().split("- pip:", 1)[1].splitlines()
    assert req == names(env_lines)
