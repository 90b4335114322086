"""OBJ/MTL, GLB and probe export: orientation, reload, glTF validity, geometry-only output."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh

from render.bake import BakedMaps
from render.export import (MESH_WRITERS, TEXTURE_FILES, ExportError, encode_maps, export_mesh, read_png_rgb,
                           srgb_to_linear, write_glb, write_obj, write_probe)
from render.mesh import Mesh, MeshError, load_mesh
from render.uv import PackOptions, unwrap

REPO = Path(__file__).resolve().parents[1]
VALIDATOR_DIR = REPO / "tools" / "node" / "node_modules" / "gltf-validator"

# Quadrant colours (linear), by image quadrant: top-left, top-right, bottom-left, bottom-right.
QUAD_COLOURS = {"tl": (1.0, 0.0, 0.0), "tr": (0.0, 1.0, 0.0), "bl": (0.0, 0.0, 1.0), "br": (1.0, 1.0, 0.0)}


def _plane_mesh(n: int = 4) -> Mesh:
    """n x n grid in the z = 0 plane with position (x, y) == uv (u, v), OBJ convention."""
    g = np.linspace(0.0, 1.0, n + 1)
    xx, yy = np.meshgrid(g, g, indexing="xy")
    uv_vx2 = np.stack([xx.ravel(), yy.ravel()], axis=-1)
    pos_vx3 = np.concatenate([uv_vx2, np.zeros_like(uv_vx2[:, :1])], axis=-1)
    faces = []
    for r in range(n):
        for c in range(n):
            a, d = r * (n + 1) + c, (r + 1) * (n + 1) + c
            b, e = a + 1, d + 1
            faces += [(a, b, e), (a, e, d)]                     # counter-clockwise seen from +z
    f = torch.tensor(faces, dtype=torch.int64)
    return Mesh(v_pos=torch.tensor(pos_vx3, dtype=torch.float32), t_pos_idx=f,
                v_tex=torch.tensor(uv_vx2, dtype=torch.float32), t_tex_idx=f.clone())


def _quadrant_maps(res: int = 64) -> BakedMaps:
    """kd with one colour per image quadrant; constant ks; flat normal map."""
    kd = torch.zeros(res, res, 3)
    h = res // 2
    kd[:h, :h] = torch.tensor(QUAD_COLOURS["tl"])
    kd[:h, h:] = torch.tensor(QUAD_COLOURS["tr"])
    kd[h:, :h] = torch.tensor(QUAD_COLOURS["bl"])
    kd[h:, h:] = torch.tensor(QUAD_COLOURS["br"])
    ks = torch.zeros(res, res, 3)
    ks[..., 0], ks[..., 1], ks[..., 2] = 0.25, 0.5, 0.75
    nrm = torch.zeros(res, res, 3)
    nrm[..., 2] = 1.0
    return BakedMaps(kd=kd, ks=ks, nrm=nrm, mask=torch.ones(res, res, dtype=torch.bool))


def _expected_quadrant(x: float, y: float) -> tuple[float, float, float]:
    """Colour a point at position (x, y) = uv must get: v > 0.5 is the image's top half."""
    return QUAD_COLOURS[("t" if y > 0.5 else "b") + ("l" if x < 0.5 else "r")]


def _tiny_textured(res: int = 32) -> tuple[Mesh, BakedMaps]:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    mesh = Mesh(v_pos=torch.tensor(sphere.vertices, dtype=torch.float32),
                t_pos_idx=torch.tensor(sphere.faces, dtype=torch.int64))
    mesh = unwrap(mesh, pack_options=PackOptions(padding=2))
    gen = torch.Generator().manual_seed(0)
    nrm = torch.randn(res, res, 3, generator=gen) * 0.3
    nrm[..., 2] = 1.0
    nrm = nrm / nrm.norm(dim=-1, keepdim=True)
    maps = BakedMaps(kd=torch.rand(res, res, 3, generator=gen), ks=torch.rand(res, res, 3, generator=gen),
                     nrm=nrm, mask=torch.ones(res, res, dtype=torch.bool))
    return mesh, maps


# ----------------------------------------------------------------------------------------------
# glTF validator


def run_gltf_validator(path: Path) -> dict:
    """Khronos validator report for `path`. Skips only without node; a failed install FAILS."""
    if shutil.which("node") is None:
        pytest.skip("node is not on PATH: the Khronos glTF validator (npm gltf-validator) needs Node.js")
    if not VALIDATOR_DIR.is_dir():
        install = subprocess.run(["bash", str(REPO / "scripts" / "install_gltf_validator.sh")],
                                 capture_output=True, text=True, timeout=300)
        if install.returncode != 0 or not VALIDATOR_DIR.is_dir():
            pytest.fail("scripts/install_gltf_validator.sh failed (CI installs the validator, so this "
                        f"is an error):\n{install.stdout}\n{install.stderr}")
    proc = subprocess.run(["node", str(REPO / "scripts" / "validate_gltf.js"), str(path)],
                          capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, 1):
        pytest.fail(f"validate_gltf.js could not validate {path}: {proc.stderr}")
    return json.loads(proc.stdout)


def _glb_json(path: Path) -> dict:
    data = path.read_bytes()
    magic, version, length = struct.unpack("<III", data[:12])
    assert (magic, version, length) == (0x46546C67, 2, len(data))
    chunk_len, chunk_type = struct.unpack("<II", data[12:20])
    assert chunk_type == 0x4E4F534A
    return json.loads(data[20:20 + chunk_len])


def _issue_summary(report: dict) -> str:
    return "\n".join(f"{m['severity']} {m['code']} {m.get('pointer', '')}: {m['message']}"
                     for m in report["issues"]["messages"])


def test_glb_textured_passes_khronos_validator(tmp_path: Path) -> None:
    mesh, maps = _tiny_textured()
    glb = write_glb(tmp_path / "mesh.glb", mesh, maps)
    report = run_gltf_validator(glb)
    assert report["issues"]["numErrors"] == 0, _issue_summary(report)
    doc = _glb_json(glb)
    material = doc["materials"][0]
    pbr = material["pbrMetallicRoughness"]
    assert {"baseColorTexture", "metallicRoughnessTexture"} <= set(pbr)
    assert material["occlusionTexture"]["index"] == pbr["metallicRoughnessTexture"]["index"]
    assert "normalTexture" in material
    attrs = doc["meshes"][0]["primitives"][0]["attributes"]
    assert {"POSITION", "NORMAL", "TEXCOORD_0", "TANGENT"} <= set(attrs)


def test_glb_geometry_only_is_untextured_and_valid(tmp_path: Path) -> None:
    mesh, _ = _tiny_textured()
    glb = write_glb(tmp_path / "mesh.glb", mesh, maps=None)
    report = run_gltf_validator(glb)
    assert report["issues"]["numErrors"] == 0, _issue_summary(report)
    doc = _glb_json(glb)
    assert "images" not in doc and "textures" not in doc
    pbr = doc["materials"][0]["pbrMetallicRoughness"]
    assert "baseColorTexture" not in pbr and len(pbr["baseColorFactor"]) == 4


def test_glb_reloads_in_trimesh_with_uv_flip(tmp_path: Path) -> None:
    mesh = _plane_mesh()
    glb = write_glb(tmp_path / "plane.glb", mesh, _quadrant_maps())
    scene = trimesh.load(str(glb), process=False)
    part = next(iter(scene.geometry.values()))
    # trimesh converts glTF texcoords (origin top-left) back to (u, 1 - v): we must see uv == xy.
    np.testing.assert_allclose(part.visual.uv, part.vertices[:, :2], atol=1e-6)
    assert part.visual.material.baseColorTexture is not None


def test_glb_orm_image_inverts_occlusion() -> None:
    images = encode_maps(_quadrant_maps(8))
    # glTF occlusion: 1 = fully lit; ours (ks.x): 0 = unoccluded. G, B are roughness, metallic.
    np.testing.assert_array_equal(images["orm"][0, 0], [191, 128, 191])
    np.testing.assert_array_equal(images["ks"][0, 0], [64, 128, 191])


# ----------------------------------------------------------------------------------------------
# OBJ / MTL


def _mtl_references(mtl_path: Path) -> list[str]:
    refs = []
    for line in mtl_path.read_text().splitlines():
        parts = line.split()
        key = parts[0].lower() if parts else ""
        if key.startswith("map_") or key in ("bump", "norm"):
            refs.append(parts[-1])
    return refs


def test_obj_quadrant_texture_survives_write_and_reload(tmp_path: Path) -> None:
    mesh, maps = _plane_mesh(), _quadrant_maps()
    write_obj(tmp_path, mesh, maps)
    loaded = load_mesh(tmp_path / "mesh.obj")
    kd_hw3 = srgb_to_linear(loaded.material["kd"].numpy())   # file is sRGB, maps are linear
    np.testing.assert_allclose(kd_hw3, maps.kd.numpy(), atol=1e-6)
    # Each face centre samples the image at (u, 1 - v) and must see its own quadrant's colour.
    res = kd_hw3.shape[0]
    centre_uv = loaded.v_tex[loaded.t_tex_idx].mean(dim=1).numpy()      # [F, 2]
    centre_xy = loaded.v_pos[loaded.t_pos_idx].mean(dim=1).numpy()[:, :2]
    for (u, v), (x, y) in zip(centre_uv, centre_xy):
        row, col = int((1.0 - v) * res), int(u * res)
        np.testing.assert_allclose(kd_hw3[row, col], _expected_quadrant(x, y), atol=1e-6)


def test_obj_reloads_in_trimesh_with_uvs_and_textures(tmp_path: Path) -> None:
    mesh, maps = _tiny_textured()
    obj = write_obj(tmp_path, mesh, maps)
    refs = _mtl_references(tmp_path / "mesh.mtl")
    assert sorted(refs) == sorted(TEXTURE_FILES.values())
    for ref in refs:
        assert (tmp_path / ref).is_file(), f"MTL references missing texture {ref}"
    loaded = trimesh.load(str(obj), process=False)
    assert isinstance(loaded, trimesh.Trimesh)
    assert loaded.visual.uv is not None and loaded.visual.uv.shape == (len(loaded.vertices), 2)
    assert loaded.visual.material.image is not None
    assert len(loaded.faces) == mesh.num_faces
    # Positions are not merged across seams in the file: one 'v' line per mesh vertex.
    text = obj.read_text()
    assert sum(line.startswith("v ") for line in text.splitlines()) == mesh.num_vertices
    assert sum(line.startswith("vt ") for line in text.splitlines()) == mesh.v_tex.shape[0]


def test_obj_ks_and_normal_pngs_round_trip(tmp_path: Path) -> None:
    _, maps = _tiny_textured()
    write_obj(tmp_path, _tiny_textured()[0], maps)
    ks = read_png_rgb(tmp_path / TEXTURE_FILES["ks"]) / 255.0
    np.testing.assert_allclose(ks, maps.ks.numpy(), atol=0.5 / 255 + 1e-6)
    nrm = read_png_rgb(tmp_path / TEXTURE_FILES["nrm"]) / 255.0 * 2.0 - 1.0
    np.testing.assert_allclose(nrm, maps.nrm.numpy(), atol=1.0 / 255 + 1e-6)


def test_geometry_only_obj_has_plain_material_and_no_textures(tmp_path: Path) -> None:
    mesh, _ = _tiny_textured()
    obj = write_obj(tmp_path, mesh, maps=None)
    mtl = (tmp_path / "mesh.mtl").read_text()
    assert _mtl_references(tmp_path / "mesh.mtl") == []
    assert any(line.startswith("Kd ") for line in mtl.splitlines())
    assert not list(tmp_path.glob("*.png"))
    loaded = trimesh.load(str(obj), process=False)
    assert loaded.visual.uv is not None            # the atlas is kept for the appearance phase
    reloaded = load_mesh(obj)
    assert reloaded.v_tex is not None and reloaded.num_faces == mesh.num_faces


def test_textured_export_without_uvs_is_an_error(tmp_path: Path) -> None:
    mesh = _plane_mesh()
    mesh.v_tex = mesh.t_tex_idx = None
    with pytest.raises(MeshError, match="no UVs"):
        write_obj(tmp_path, mesh, _quadrant_maps())
    with pytest.raises(MeshError, match="no UVs"):
        write_glb(tmp_path / "x.glb", mesh, _quadrant_maps())


def test_non_finite_map_is_refused(tmp_path: Path) -> None:
    maps = _quadrant_maps()
    maps.kd[0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match="NaN"):
        write_obj(tmp_path, _plane_mesh(), maps)


# ----------------------------------------------------------------------------------------------
# Probe


class _FakeLight:
    def __init__(self) -> None:
        self.saved: list[Path] = []

    def save(self, path: Path) -> None:
        self.saved.append(Path(path))
        Path(path).write_bytes(b"#?RADIANCE\n")


def test_write_probe_delegates_to_light_save(tmp_path: Path) -> None:
    light = _FakeLight()
    out = write_probe(tmp_path / "sub" / "probe.hdr", light)
    assert light.saved == [out] and out.is_file()
    with pytest.raises(ExportError, match="save"):
        write_probe(tmp_path / "probe.hdr", object())


def test_a_third_format_is_one_function(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both phases export through export_mesh: a format added to MESH_WRITERS is written beside
    OBJ and GLB, and the files open in another tool (trimesh)."""
    mesh, maps = _tiny_textured()

    def write_ply(folder: Path, mesh: Mesh, maps: BakedMaps | None) -> Path:
        path = folder / "mesh.ply"
        trimesh.Trimesh(mesh.v_pos.numpy(), mesh.t_pos_idx.numpy(), process=False).export(path)
        return path

    monkeypatch.setitem(MESH_WRITERS, "ply", write_ply)
    written = export_mesh(tmp_path / "out", mesh, maps)
    assert [p.name for p in written] == ["mesh.obj", "mesh.glb", "mesh.ply"]
    for path in written:
        loaded = trimesh.load(path, force="mesh", process=False)
        assert len(loaded.faces) == len(mesh.t_pos_idx), path.name
