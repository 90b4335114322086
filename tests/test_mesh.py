"""render/mesh.py: loading every format, error cases, normals, tangents, unit_size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from render.mesh import (
    Mesh,
    MeshError,
    MeshFileNotFoundError,
    compute_tangents,
    compute_vertex_normals,
    drop_enclosed_components,
    drop_small_components,
    load_mesh,
    unit_size,
    validate_mesh,
)


def _textured_box() -> trimesh.Trimesh:
    box = trimesh.creation.box()
    rng = np.random.default_rng(0)
    uv = rng.random((len(box.vertices), 2))
    image = Image.fromarray((rng.random((8, 8, 3)) * 255).astype(np.uint8))
    box.visual = trimesh.visual.TextureVisuals(uv=uv, image=image)
    return box


@pytest.mark.parametrize("ext", ["obj", "ply", "stl", "glb", "off"])
def test_load_each_format(tmp_path: Path, ext: str) -> None:
    sphere = trimesh.creation.icosphere(subdivisions=2)
    path = tmp_path / f"sphere.{ext}"
    sphere.export(path)
    mesh = load_mesh(path)
    assert mesh.t_pos_idx.shape == (len(sphere.faces), 3)
    assert mesh.v_pos.dtype == torch.float32 and mesh.t_pos_idx.dtype == torch.int64
    lo, hi = mesh.aabb()
    assert torch.allclose(lo, torch.full((3,), -1.0), atol=1e-3)
    assert torch.allclose(hi, torch.full((3,), 1.0), atol=1e-3)
    # Same surface regardless of format (STL duplicates vertices, area is invariant).
    tri = mesh.v_pos[mesh.t_pos_idx].double()
    area = torch.linalg.norm(torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1), dim=-1).sum() / 2
    assert float(area) == pytest.approx(sphere.area, rel=1e-4)


@pytest.mark.parametrize("ext", ["obj", "glb"])
def test_load_keeps_uv_and_texture(tmp_path: Path, ext: str) -> None:
    box = _textured_box()
    path = tmp_path / f"box.{ext}"
    box.export(path)
    mesh = load_mesh(path)
    assert mesh.v_tex is not None and mesh.v_tex.shape == (len(box.vertices), 2)
    assert mesh.v_tex.dtype == torch.float32
    assert torch.allclose(mesh.v_tex, torch.from_numpy(box.visual.uv).float(), atol=1e-3)
    assert mesh.material is not None
    kd = mesh.material["kd"]
    assert kd.shape == (8, 8, 3) and kd.dtype == torch.float32
    assert 0.0 <= float(kd.min()) and float(kd.max()) <= 1.0


def test_scene_is_concatenated(tmp_path: Path) -> None:
    a = trimesh.creation.box()
    b = trimesh.creation.icosphere(subdivisions=1)
    scene = trimesh.Scene()
    scene.add_geometry(a)
    scene.add_geometry(b, transform=trimesh.transformations.translation_matrix([5.0, 0.0, 0.0]))
    path = tmp_path / "scene.glb"
    scene.export(path)
    mesh = load_mesh(path)
    assert mesh.num_faces == len(a.faces) + len(b.faces)
    assert float(mesh.aabb()[1][0]) == pytest.approx(6.0, abs=1e-4)  # transform applied


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.obj"):
        load_mesh(tmp_path / "nope.obj")
    with pytest.raises(MeshFileNotFoundError):
        load_mesh(tmp_path / "nope.obj")


def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.ply"
    path.write_text("ply\nformat ascii 1.0\nelement vertex 3\ngarbage\n")
    with pytest.raises(MeshError, match="junk.ply"):
        load_mesh(path)


def test_unsupported_extension(tmp_path: Path) -> None:
    path = tmp_path / "mesh.xyz"
    path.write_text("0 0 0\n")
    with pytest.raises(MeshError, match="unsupported extension"):
        load_mesh(path)


def test_no_faces(tmp_path: Path) -> None:
    path = tmp_path / "points.obj"
    path.write_text("v 0 0 0\nv 1 0 0\nv 0 1 0\n")
    with pytest.raises(MeshError, match=r"points\.obj.*no triangle faces"):
        load_mesh(path)


def test_nan_vertices(tmp_path: Path) -> None:
    path = tmp_path / "nan.obj"
    path.write_text("v 0 0 nan\nv 1 0 0\nv 0 1 0\nf 1 2 3\n")
    with pytest.raises(MeshError, match=r"nan\.obj.*NaN/inf"):
        load_mesh(path)


def test_face_index_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "bad.ply"
    path.write_text(
        "ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nproperty float y\n"
        "property float z\nelement face 1\nproperty list uchar int vertex_indices\nend_header\n"
        "0 0 0\n1 0 0\n0 1 0\n3 0 1 9\n"
    )
    with pytest.raises(MeshError, match=r"bad\.ply.*out of range.*max 9"):
        load_mesh(path)


def test_validate_mesh_tensors() -> None:
    v = torch.zeros(3, 3)
    with pytest.raises(MeshError, match="src.*no faces"):
        validate_mesh(Mesh(v, torch.zeros(0, 3, dtype=torch.long)), "src")
    with pytest.raises(MeshError, match="src.*out of range"):
        validate_mesh(Mesh(v, torch.tensor([[0, 1, -1]])), "src")
    with pytest.raises(MeshError, match="src.*uv"):
        validate_mesh(Mesh(v, torch.tensor([[0, 1, 2]]), v_tex=torch.zeros(3, 2)), "src")


def test_vertex_normals_sphere() -> None:
    sphere = trimesh.creation.icosphere(subdivisions=3)
    mesh = Mesh(torch.from_numpy(sphere.vertices).float(), torch.from_numpy(sphere.faces).long())
    mesh = compute_vertex_normals(mesh)
    expected = mesh.v_pos / mesh.v_pos.norm(dim=-1, keepdim=True)
    assert torch.equal(mesh.t_nrm_idx, mesh.t_pos_idx)
    assert float((mesh.v_nrm * expected).sum(-1).min()) > 0.999


def test_vertex_normals_area_weighted() -> None:
    # Vertex 0 shared by a large triangle in the xy plane and a small one in the xz plane.
    v = torch.tensor([[0, 0, 0], [10, 0, 0], [0, 10, 0], [0, 0, 1], [1, 0, 0.0]])
    f = torch.tensor([[0, 1, 2], [0, 3, 4]])
    n = compute_vertex_normals(Mesh(v, f)).v_nrm[0]
    expected = torch.tensor([0.0, 1.0, 100.0]) / np.hypot(1, 100)   # areas 50 and 0.5
    assert torch.allclose(n, expected, atol=1e-5)


def test_tangents_planar() -> None:
    # Quad in the xy plane with u along +x: tangent must be +x, orthogonal to the normal.
    v = torch.tensor([[0, 0, 0], [2, 0, 0], [2, 2, 0], [0, 2, 0.0]])
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = v[:, :2] / 2
    mesh = compute_tangents(Mesh(v, f, v_tex=uv, t_tex_idx=f))
    assert torch.allclose(mesh.v_tng, torch.tensor([1.0, 0, 0]).expand(4, 3), atol=1e-6)
    assert torch.equal(mesh.t_tng_idx, mesh.t_nrm_idx)


def test_tangents_orthogonal_on_textured_box(tmp_path: Path) -> None:
    path = tmp_path / "box.obj"
    _textured_box().export(path)
    mesh = compute_tangents(load_mesh(path))
    assert float((mesh.v_tng * mesh.v_nrm).sum(-1).abs().max()) < 1e-5
    assert torch.allclose(mesh.v_tng.norm(dim=-1), torch.ones(mesh.v_tng.shape[0]), atol=1e-5)


def test_tangents_need_uv() -> None:
    with pytest.raises(MeshError, match="no UVs"):
        compute_tangents(Mesh(torch.eye(3), torch.tensor([[0, 1, 2]])))


def test_unit_size_and_to() -> None:
    v = torch.tensor([[1, 1, 1], [3, 1, 1], [1, 5, 1], [1, 1, 9.0]])
    mesh = unit_size(Mesh(v, torch.tensor([[0, 1, 2], [0, 2, 3]])))
    assert torch.allclose(mesh.v_pos.mean(0), torch.zeros(3), atol=1e-6)
    assert float(mesh.v_pos.norm(dim=-1).max()) == pytest.approx(1.0, abs=1e-6)
    moved = mesh.to("cpu")
    assert moved.v_pos.device.type == "cpu" and moved.t_pos_idx.dtype == torch.int64


def _parts(*meshes: trimesh.Trimesh) -> Mesh:
    """One Mesh holding several disjoint parts (vertices shared within each part, as marching tets)."""
    both = trimesh.util.concatenate(list(meshes))
    return Mesh(torch.tensor(both.vertices, dtype=torch.float32), torch.tensor(both.faces, dtype=torch.int64))


def test_drop_small_components_keeps_the_body_and_drops_floaters() -> None:
    body = trimesh.creation.icosphere(subdivisions=4)                              # 5120 faces
    handle = trimesh.creation.icosphere(subdivisions=2).apply_translation([3, 0, 0])  # 320 faces: 5.8%
    floater = trimesh.creation.icosphere(subdivisions=0, radius=0.05).apply_translation([0, 3, 0])  # 20
    mesh = _parts(floater, body, handle)
    out, report = drop_small_components(mesh, 0.01)
    assert (report.components, report.dropped, report.dropped_faces) == (3, 1, 20)
    assert out.t_pos_idx.shape == (5120 + 320, 3) and out.v_pos.shape[0] == 2562 + 162
    assert out.t_pos_idx.min() == 0 and out.t_pos_idx.max() == out.v_pos.shape[0] - 1   # compacted
    # What is left is exactly the body and the handle (the floater sat at y = 3).
    assert out.v_pos[:, 1].max() < 1.01
    kept = trimesh.Trimesh(out.v_pos.numpy(), out.t_pos_idx.numpy(), process=False)
    assert len(kept.split(only_watertight=False)) == 2
    np.testing.assert_allclose(kept.area, body.area + handle.area, rtol=1e-5)
    # A 10% bar also removes the handle; the largest component always stays, 0 keeps everything.
    assert drop_small_components(mesh, 0.1)[1].dropped_faces == 340
    assert drop_small_components(_parts(floater), 0.99)[0].t_pos_idx.shape == (20, 3)
    same, report = drop_small_components(mesh, 0.0)
    assert same is mesh and report.dropped == 0
    with pytest.raises(ValueError, match="min_fraction"):
        drop_small_components(mesh, 1.0)


def test_drop_enclosed_components_removes_hidden_voids_only() -> None:
    body = trimesh.creation.icosphere(subdivisions=4)                                    # solid, r = 1
    void = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    void.invert()                                                # a bubble in the body: faces point inward
    tube = trimesh.creation.annulus(r_min=0.5, r_max=0.8, height=1.0).apply_translation([3, 0, 0])
    in_hole = trimesh.creation.icosphere(subdivisions=1, radius=0.2).apply_translation([3, 0, 0])  # seen
    mesh = _parts(body, void, tube, in_hole)
    out, report = drop_enclosed_components(mesh)
    assert (report.components, report.dropped, report.dropped_faces) == (4, 1, len(void.faces))
    kept = trimesh.Trimesh(out.v_pos.numpy(), out.t_pos_idx.numpy(), process=False)
    np.testing.assert_allclose(kept.area, body.area + tube.area + in_hole.area, rtol=1e-5)
    assert drop_enclosed_components(_parts(body))[0].t_pos_idx.shape == (len(body.faces), 3)
    # The largest component stays even inside another (a small shell around it is what views see).
    skin = trimesh.creation.icosphere(subdivisions=2, radius=1.2)
    assert drop_enclosed_components(_parts(skin, body))[1].dropped_faces == 0
