"""End to end on CPU with the tiny model: an appearance run on a user mesh
without UVs (so the phase unwraps it with xatlas), its output checked as users receive it - the
run folder, OBJ/MTL with all textures reloading in trimesh, the GLB passing the Khronos glTF
validator, the light probe - and the exported OBJ accepted again as `base_mesh`. Runs
train.py's main() in-process.

The base mesh is generated rather than taken from a tiny geometry run: on CPU the SDF
pretraining a geometry run needs to keep a closed surface costs minutes, and the geometry
export is covered by tests/test_train_geometry.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh

import train
from geometry.fixed_mesh import FixedMeshGeometry
from render.export import read_png_rgb
from render.light import read_hdr
from tests.test_export import run_gltf_validator

# One process, no emulate_gpus: the trainer's sector-coverage advice is expected here.
# One appearance run end to end (slow tier), its outputs checked by the tests below.
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:each optimizer step draws cameras")]

TEXTURE_RES = 128
TRAIN_RES = 64
APPEARANCE_ITERS = 4
SAVE_INTERVAL = 2
VIDEO_FRAMES = 6
DISPLAY = [{"latlong": True}, {"bsdf": "kd"}, {"bsdf": "ks"}, {"bsdf": "normal"}]
# Layers the validation writes: the shaded image always, then one per display entry.
VALIDATION_LAYERS = ("shaded", "latlong", "kd", "ks", "normal")
TEXTURES = ("texture_kd.png", "texture_ks.png", "texture_n.png")


def write_config(folder: Path, name: str, values: dict[str, Any]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    path.write_text(json.dumps(values))
    return path


def write_user_mesh(path: Path) -> Path:
    """A lumpy ellipsoid OBJ with no UVs: not symmetric, so wrong orientations would show."""
    mesh = trimesh.creation.icosphere(subdivisions=3)
    mesh.apply_scale([0.55, 0.7, 0.45])
    mesh.vertices += 0.05 * np.sin(4.0 * mesh.vertices[:, [1, 2, 0]])
    path.parent.mkdir(parents=True, exist_ok=True)
    mesh.export(path, include_texture=False)
    return path


def tiny_appearance(sd_model: Path, base_mesh: Path, out_dir: Path, **extra: Any) -> dict[str, Any]:
    return {"mode": "appearance_modeling", "text": "a red cup", "sd_model": str(sd_model), "device": "cpu",
            "seed": 11, "base_mesh": str(base_mesh), "train_res": [TRAIN_RES, TRAIN_RES], "batch": 1,
            "iter": APPEARANCE_ITERS, "coarse_iter": 2, "save_interval": SAVE_INTERVAL,
            "sds_weight_strategy": 2, "env_res": 64, "texture_res": [TEXTURE_RES, TEXTURE_RES],
            "display": DISPLAY, "video_frames": VIDEO_FRAMES, "out_dir": str(out_dir), **extra}


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> dict[str, Path]:
    """An appearance run on a UV-less user mesh; its folder."""
    root = tmp_path_factory.mktemp("e2e")
    base_mesh = write_user_mesh(root / "user" / "blob.obj")
    appearance = root / "appearance"
    cfg = write_config(root, "appearance", tiny_appearance(tiny_sd_path, base_mesh, appearance))
    assert train.main(["--config", str(cfg)]) == 0
    return {"root": root, "appearance": appearance, "base_mesh": base_mesh}


def mtl_references(mtl_path: Path) -> list[str]:
    refs = []
    for line in mtl_path.read_text().splitlines():
        parts = line.split()
        if parts and (parts[0].lower().startswith("map_") or parts[0].lower() in ("bump", "norm")):
            refs.append(parts[-1])
    return refs


# ------------------------------------------------------------------------------------------------
# The run folder
# ------------------------------------------------------------------------------------------------
def test_appearance_run_writes_the_run_folder(e2e: dict[str, Path]) -> None:
    run = e2e["appearance"]
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["mode"] == "appearance_modeling" and resolved["base_mesh"] == str(e2e["base_mesh"])

    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["it"] for r in log] == list(range(1, APPEARANCE_ITERS + 1))
    assert all(r["stage"] == "appearance" and np.isfinite(r["loss"]) and r["nonfinite"] == 0 for r in log)

    for it in range(SAVE_INTERVAL, APPEARANCE_ITERS + 1, SAVE_INTERVAL):
        for layer in VALIDATION_LAYERS:
            image = iio.imread(run / "validation" / f"it{it:06d}_{layer}.png")
            # Four views side by side; the environment is one lat-long image twice as wide as high.
            expected = (TRAIN_RES, 2 * TRAIN_RES, 3) if layer == "latlong" else (TRAIN_RES, 4 * TRAIN_RES, 3)
            assert image.shape == expected, layer
            assert image.std() > 1.0, f"{layer} is a flat image"  # object on background / sky gradient

    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["it"] == APPEARANCE_ITERS and ckpt["config"] == resolved
    assert ckpt["phase"]["material"] and ckpt["optimizer"]["state"]

    out = run / "dmtet_mesh"
    for name in ("mesh.obj", "mesh.mtl", *TEXTURES, "mesh.glb", "probe.hdr"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    assert (run / "video.mp4").stat().st_size > 1000


# ------------------------------------------------------------------------------------------------
# OBJ / MTL / textures
# ------------------------------------------------------------------------------------------------
def test_obj_reloads_in_trimesh_with_uvs_and_all_textures(e2e: dict[str, Path]) -> None:
    out = e2e["appearance"] / "dmtet_mesh"
    refs = mtl_references(out / "mesh.mtl")
    assert sorted(refs) == sorted(TEXTURES)
    for ref in refs:
        assert read_png_rgb(out / ref).shape == (TEXTURE_RES, TEXTURE_RES, 3), ref

    loaded = trimesh.load(out / "mesh.obj", process=False)
    assert isinstance(loaded, trimesh.Trimesh)
    assert loaded.visual.uv is not None and loaded.visual.uv.shape == (len(loaded.vertices), 2)
    assert loaded.visual.material.image is not None
    # The user's surface, unchanged (xatlas only splits vertices along UV seams).
    source = trimesh.load(e2e["base_mesh"], process=False)
    assert len(loaded.faces) == len(source.faces)
    np.testing.assert_allclose(loaded.vertices[loaded.faces], source.vertices[source.faces], atol=1e-5)
    assert 0.0 <= loaded.visual.uv.min() and loaded.visual.uv.max() <= 1.0


def test_normal_map_decodes_to_unit_upward_vectors(e2e: dict[str, Path]) -> None:
    nrm = read_png_rgb(e2e["appearance"] / "dmtet_mesh" / "texture_n.png").astype(np.float64) / 255.0 * 2 - 1
    length = np.linalg.norm(nrm, axis=-1)
    assert np.abs(length - 1).max() <= 0.02
    assert nrm[..., 2].min() >= 0


# ------------------------------------------------------------------------------------------------
# GLB and probe
# ------------------------------------------------------------------------------------------------
def test_glb_passes_khronos_validator(e2e: dict[str, Path]) -> None:
    glb = e2e["appearance"] / "dmtet_mesh" / "mesh.glb"
    report = run_gltf_validator(glb)
    messages = "\n".join(f"{m['severity']} {m['code']} {m.get('pointer', '')}: {m['message']}"
                         for m in report["issues"]["messages"])
    assert report["issues"]["numErrors"] == 0, messages
    loaded = trimesh.load(glb, force="mesh")
    obj = trimesh.load(e2e["appearance"] / "dmtet_mesh" / "mesh.obj", process=False)
    assert len(loaded.faces) == len(obj.faces)


def test_probe_is_the_environment_as_hdr(e2e: dict[str, Path]) -> None:
    probe = read_hdr(e2e["appearance"] / "dmtet_mesh" / "probe.hdr")
    assert probe.shape[1] == 2 * probe.shape[0]            # lat-long
    assert np.isfinite(probe).all() and probe.min() >= 0 and probe.max() > 0
    assert probe.std() > 0                                  # not a blank map


# ------------------------------------------------------------------------------------------------
# The output goes back in
# ------------------------------------------------------------------------------------------------
def test_exported_obj_is_accepted_as_base_mesh(e2e: dict[str, Path], tiny_sd_path: Path) -> None:
    exported = e2e["appearance"] / "dmtet_mesh" / "mesh.obj"
    # Its UVs are read back, not re-unwrapped: the baked textures stay valid for this mesh.
    assert not FixedMeshGeometry(exported).unwrapped
    again = e2e["root"] / "again"
    cfg = write_config(e2e["root"], "again", tiny_appearance(tiny_sd_path, exported, again, iter=2,
                                                               validate=False, video_frames=0))
    assert train.main(["--config", str(cfg)]) == 0
    first = trimesh.load(exported, process=False)
    second = trimesh.load(again / "dmtet_mesh" / "mesh.obj", process=False)
    assert len(second.faces) == len(first.faces)
    np.testing.assert_allclose(second.visual.uv, first.visual.uv, atol=1e-5)
