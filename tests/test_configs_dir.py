"""The shipped configs/: every file passes `train.py --check`, appearance configs read the mesh their
geometry config writes, the published-equivalent ones keep the published values, and the user-mesh
example points at a mesh the project ships."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh

import config as C
from tests.run_helpers import PUBLISHED_CONFIGS

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.json"))

# configs/ file -> (published file it is equivalent to, keys whose value deliberately differs).
# Everywhere: base_mesh of appearance configs is fixed to the path the geometry config writes,
# and the published envmap (data/irrmaps/mud_road_puresky_4k.hdr, not shipped) is left out.
PUBLISHED_EQUIVALENTS = {
    "car_geometry": ("car_geometry", set()),
    "car_appearance_strategy0": ("car_appearance_strategy0", {"base_mesh"}),
    "car_appearance_strategy1": ("car_appearance_strategy1", {"base_mesh"}),
    "pineapple_geometry_single_gpu": ("pineapple_geometry_single_gpu", set()),
    "pineapple_appearance_strategy0_single_gpu": ("pineapple_appearance_strategy0_single_gpu", {"base_mesh"}),
    # No published single-GPU strategy-2 pineapple: the strategy-0 one with strategy 2 and its own run folder.
    "pineapple_appearance_strategy2_single_gpu": ("pineapple_appearance_strategy0_single_gpu",
                                                  {"base_mesh", "sds_weight_strategy", "out_dir"}),
}
REQUIRED = set(PUBLISHED_EQUIVALENTS) | {"user_mesh_geometry", "tiny_cpu_geometry", "tiny_cpu_appearance"}
MESH_SUFFIX = ("dmtet_mesh", "mesh.obj")  # trainer: run_dir / "dmtet_mesh"; render.export.write_obj: mesh.obj


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def mode_of(path: Path) -> str:
    return load(path).get("mode", "geometry_modeling")


GEOMETRY = [p for p in CONFIGS if mode_of(p) == "geometry_modeling"]
APPEARANCE = [p for p in CONFIGS if mode_of(p) == "appearance_modeling"]


def geometry_mesh_path(path: Path) -> str:
    """The base_mesh value that reads what this geometry config exports (relative, as written)."""
    return "/".join(("out", load(path)["out_dir"], *MESH_SUFFIX))


def run_check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), "--config", str(path), "--check"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def missing_base_mesh_message(base_mesh: str) -> str:
    places = sorted({str(ROOT), str(C.PROJECT_ROOT)})
    return (f"error: file not found for 'base_mesh': {base_mesh} (looked in {' and '.join(places)}); "
            "the mesh to texture; run the geometry config first or point base_mesh at an existing OBJ/PLY/GLB")


def test_required_configs_present():
    names = {p.stem for p in CONFIGS}
    assert REQUIRED <= names, f"missing from configs/: {sorted(REQUIRED - names)}"
    assert APPEARANCE and GEOMETRY


@pytest.mark.parametrize("path", GEOMETRY, ids=[p.stem for p in GEOMETRY])
def test_geometry_config_passes_check(path):
    r = run_check(path)
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["mode"] == "geometry_modeling"
    assert resolved["out_dir"], f"{path.name}: a geometry config must name its out_dir (appearance configs read it)"


@pytest.mark.parametrize("path", APPEARANCE, ids=[p.stem for p in APPEARANCE])
def test_appearance_config_passes_check_but_for_its_geometry_output(path):
    """Passes, or fails only because its geometry config has not been run yet (exactly that message)."""
    base_mesh = load(path)["base_mesh"]
    r = run_check(path)
    if C.resolve_path(base_mesh).is_file():  # the geometry config was run in this checkout
        assert r.returncode == 0, r.stderr
        return
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stdout == ""
    assert r.stderr.strip() == missing_base_mesh_message(base_mesh)


@pytest.mark.parametrize("path", APPEARANCE, ids=[p.stem for p in APPEARANCE])
def test_appearance_base_mesh_is_written_by_a_geometry_config(path):
    data = load(path)
    written = {geometry_mesh_path(g): g.name for g in GEOMETRY}
    assert data.get("base_mesh") in written, (
        f"{path.name}: base_mesh {data.get('base_mesh')!r} is not the output of any geometry config in "
        f"configs/; expected one of {sorted(written)}")
    # The same file as the trainer's run folder: Config.run_dir(...) / dmtet_mesh / mesh.obj.
    geo = written[data["base_mesh"]]
    geo_cfg = C.load_config(CONFIG_DIR / geo)
    expected = geo_cfg.run_dir(CONFIG_DIR / geo).joinpath(*MESH_SUFFIX)
    assert Path.cwd() / data["base_mesh"] == expected
    # Same prompt for the texture as for the shape it textures.
    assert load(path)["text"] == load(CONFIG_DIR / geo)["text"]


def test_run_folders_do_not_collide():
    out_dirs = [load(p).get("out_dir") for p in CONFIGS]
    assert all(out_dirs), "every shipped config names its out_dir"
    assert len(set(out_dirs)) == len(out_dirs), f"two configs share a run folder: {out_dirs}"


def test_no_config_names_an_unshipped_envmap():
    for p in CONFIGS:
        env = load(p).get("envmap")
        assert env is None or C.resolve_path(env).is_file(), f"{p.name}: envmap {env} is not shipped"


@pytest.mark.parametrize("name", sorted(PUBLISHED_EQUIVALENTS))
def test_published_values_kept(name):
    published_name, differ = PUBLISHED_EQUIVALENTS[name]
    ours, published = load(CONFIG_DIR / f"{name}.json"), dict(PUBLISHED_CONFIGS[published_name])
    published.pop("envmap", None)  # not shipped; the default studio sky is used
    assert set(ours) == set(published), (sorted(set(ours) ^ set(published)))
    for key, value in published.items():
        if key not in differ:
            assert ours[key] == value, f"{name}.json: {key} = {ours[key]!r}, published {value!r}"
    if "sds_weight_strategy" in differ:
        assert ours["sds_weight_strategy"] == 2


def test_user_mesh_config_mesh_exists():
    data = load(CONFIG_DIR / "user_mesh_geometry.json")
    assert data["mode"] == "geometry_modeling" and data["sdf_init_shape"] == "custom_mesh"
    mesh_path = C.resolve_path(data["base_mesh"])
    assert mesh_path.is_file(), f"{data['base_mesh']} missing; run python scripts/make_example_mesh.py"
    assert mesh_path.stat().st_size < 200 * 1024
    mesh = trimesh.load(mesh_path, force="mesh", process=True)
    assert len(mesh.faces) > 1000 and mesh.is_watertight and mesh.volume > 0


def test_tiny_cpu_pair_is_tiny():
    geo, app = load(CONFIG_DIR / "tiny_cpu_geometry.json"), load(CONFIG_DIR / "tiny_cpu_appearance.json")
    for data in (geo, app):
        assert data["sd_model"] == "data/tiny_sd" and data["device"] == "cpu"
        assert data["train_res"] == [64, 64] and data["iter"] <= 100 and data.get("batch", 1) == 1
    assert geo["dmtet_grid"] == 32
    assert app["base_mesh"] == geometry_mesh_path(CONFIG_DIR / "tiny_cpu_geometry.json")
