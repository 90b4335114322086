"""Triangle mesh container, loading (trimesh) and per-vertex frames.

Conventions
- `v_pos [V, 3] float32`, `t_pos_idx [F, 3] int64` (rasterizers want int32: convert at the call).
- Attribute streams (normals, UVs, tangents) have their own index buffers, like OBJ.
- UVs keep the OBJ convention (origin bottom-left). Texture images in `material` are stored as in
  the file (row 0 = top of the image), so a texture lookup with image-row-0-at-v=0 semantics
  (nvdiffrast) uses `(u, 1 - v)`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import igl
import numpy as np
import torch
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from render.util import device_constant, gather_rows

SUPPORTED_SUFFIXES = (".obj", ".ply", ".stl", ".glb", ".gltf", ".off")


class MeshError(ValueError):
    """A mesh file or mesh tensor set is unusable; the message names the source and the problem."""


class MeshFileNotFoundError(MeshError, FileNotFoundError):
    """The mesh path does not exist (also catchable as FileNotFoundError)."""


@dataclass
class Mesh:
    v_pos: Tensor                       # [V, 3] float32
    t_pos_idx: Tensor                   # [F, 3] int64
    v_nrm: Tensor | None = None         # [Vn, 3] float32, indexed by t_nrm_idx [F, 3]
    t_nrm_idx: Tensor | None = None
    v_tex: Tensor | None = None         # [Vt, 2] float32, indexed by t_tex_idx [F, 3]
    t_tex_idx: Tensor | None = None
    v_tng: Tensor | None = None         # [Vg, 3] float32, indexed by t_tng_idx [F, 3]
    t_tng_idx: Tensor | None = None
    material: dict | None = None        # e.g. {"kd": [H, W, 3] float32 in [0, 1]}

    def to(self, device: torch.device | str) -> "Mesh":
        def move(x: Any) -> Any:
            if isinstance(x, Tensor):
                return x.to(device)
            if isinstance(x, dict):
                return {k: move(v) for k, v in x.items()}
            return x

        return Mesh(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def aabb(self) -> tuple[Tensor, Tensor]:
        """Axis-aligned bounding box: (min [3], max [3])."""
        return self.v_pos.min(dim=0).values, self.v_pos.max(dim=0).values

    @property
    def num_vertices(self) -> int:
        return int(self.v_pos.shape[0])

    @property
    def num_faces(self) -> int:
        return int(self.t_pos_idx.shape[0])


# ----------------------------------------------------------------------------------------------
# Validation


def _check_stream(name: str, values: Tensor | None, idx: Tensor | None, width: int, num_faces: int,
                  source: str) -> None:
    if values is None and idx is None:
        return
    if values is None or idx is None:
        raise MeshError(f"{source}: attribute '{name}' has values={values is not None} but "
                        f"indices={idx is not None}; both or neither are required")
    if values.ndim != 2 or values.shape[1] != width:
        raise MeshError(f"{source}: '{name}' values must be [N, {width}], got {tuple(values.shape)}")
    if idx.shape != (num_faces, 3):
        raise MeshError(f"{source}: '{name}' index must be [F={num_faces}, 3], got {tuple(idx.shape)}")
    if idx.dtype.is_floating_point:
        raise MeshError(f"{source}: '{name}' index must be an integer tensor, got {idx.dtype}")
    bad = ~torch.isfinite(values)
    if bool(bad.any()):
        rows = int(bad.any(dim=1).sum())
        raise MeshError(f"{source}: {rows} of {values.shape[0]} '{name}' entries are NaN/inf; "
                        "fix or remove them in the source file")
    if idx.numel() > 0:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= values.shape[0]:
            n_bad = int(((idx < 0) | (idx >= values.shape[0])).any(dim=1).sum())
            raise MeshError(f"{source}: {n_bad} faces index '{name}' out of range: indices must be in "
                            f"[0, {values.shape[0] - 1}], got min {lo} max {hi}")


def validate_mesh(mesh: Mesh, source: str) -> None:
    """Raise MeshError naming `source` if the mesh is empty, non-finite or has bad indices."""
    v, f = mesh.v_pos, mesh.t_pos_idx
    if v.ndim != 2 or v.shape[1] != 3:
        raise MeshError(f"{source}: vertex positions must be [V, 3], got {tuple(v.shape)}")
    if v.shape[0] == 0:
        raise MeshError(f"{source}: mesh has no vertices")
    if f.ndim != 2 or f.shape[1] != 3:
        raise MeshError(f"{source}: faces must be triangles [F, 3], got {tuple(f.shape)}")
    if f.shape[0] == 0:
        raise MeshError(f"{source}: mesh has no faces (a point cloud or an empty file?); "
                        "a triangle mesh is required")
    num_f = int(f.shape[0])
    _check_stream("position", v, f, 3, num_f, source)
    _check_stream("normal", mesh.v_nrm, mesh.t_nrm_idx, 3, num_f, source)
    _check_stream("uv", mesh.v_tex, mesh.t_tex_idx, 2, num_f, source)
    _check_stream("tangent", mesh.v_tng, mesh.t_tng_idx, 3, num_f, source)


# ----------------------------------------------------------------------------------------------
# Loading


def _image_to_tensor(image: Any) -> Tensor | None:
    """PIL image -> [H, W, 3] float32 in [0, 1] (alpha dropped, greyscale expanded)."""
    if image is None:
        return None
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # [H, W, 3]
    return torch.from_numpy(arr.copy())


def _kd_image(visual: Any) -> Tensor | None:
    material = getattr(visual, "material", None)
    if material is None:
        return None
    # SimpleMaterial (OBJ/MTL) has .image; PBRMaterial (GLB) has .baseColorTexture.
    image = getattr(material, "image", None)
    if image is None:
        image = getattr(material, "baseColorTexture", None)
    return _image_to_tensor(image)


def _mesh_parts(loaded: Any) -> list[Any]:
    """A loaded trimesh object -> list of Trimesh with scene transforms applied."""
    if isinstance(loaded, trimesh.Trimesh):
        return [loaded]
    if isinstance(loaded, trimesh.Scene):
        parts = []
        for node in loaded.graph.nodes_geometry:
            transform, geom_name = loaded.graph[node]
            geom = loaded.geometry[geom_name]
            if isinstance(geom, trimesh.Trimesh):
                part = geom.copy()
                part.apply_transform(transform)
                parts.append(part)
        return parts
    return []  # PointCloud, Path, ...: no faces


def load_mesh(path: str | os.PathLike, device: torch.device | str = "cpu") -> Mesh:
    """Load OBJ/PLY/STL/GLB/OFF with trimesh; scenes are concatenated into one mesh.

    UVs are kept when every part has them; the first part's base-colour image becomes
    `material["kd"]`. Raises MeshError (MeshFileNotFoundError for a missing path) naming the file.
    """
    p = Path(path)
    if not p.exists():
        raise MeshFileNotFoundError(f"mesh file '{p}' does not exist; check the path "
                                    f"(cwd is {Path.cwd()})")
    if not p.is_file():
        raise MeshError(f"mesh path '{p}' is not a regular file")
    if p.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise MeshError(f"mesh file '{p}': unsupported extension '{p.suffix}', expected one of "
                        f"{', '.join(SUPPORTED_SUFFIXES)}")
    try:
        # process=False: keep vertex order and do not silently drop or merge anything.
        loaded = trimesh.load(str(p), process=False)
    except Exception as exc:  # trimesh raises many types for corrupt files
        raise MeshError(f"mesh file '{p}' could not be read by trimesh: "
                        f"{type(exc).__name__}: {exc}") from exc

    parts = [m for m in _mesh_parts(loaded) if len(m.faces) > 0 or len(m.vertices) > 0]
    if not parts or sum(len(m.faces) for m in parts) == 0:
        raise MeshError(f"mesh file '{p}' contains no triangle faces "
                        f"(trimesh loaded a {type(loaded).__name__})")

    positions, faces, uvs = [], [], []
    has_uv = True
    offset = 0
    kd = None
    for m in parts:
        positions.append(np.asarray(m.vertices, dtype=np.float64))
        faces.append(np.asarray(m.faces, dtype=np.int64) + offset)
        uv = getattr(m.visual, "uv", None) if m.visual is not None else None
        if uv is None or len(uv) != len(m.vertices):
            has_uv = False
        else:
            uvs.append(np.asarray(uv, dtype=np.float64)[:, :2])
            if kd is None:
                kd = _kd_image(m.visual)
        offset += len(m.vertices)

    v_pos = torch.from_numpy(np.concatenate(positions)).float()
    t_pos_idx = torch.from_numpy(np.concatenate(faces)).long()
    mesh = Mesh(v_pos=v_pos, t_pos_idx=t_pos_idx)
    if has_uv:
        mesh.v_tex = torch.from_numpy(np.concatenate(uvs)).float()
        mesh.t_tex_idx = t_pos_idx.clone()
        if kd is not None:
            mesh.material = {"kd": kd}
    validate_mesh(mesh, str(p))
    return mesh.to(device)


# ----------------------------------------------------------------------------------------------
# Frames


def _safe_normalize(x: Tensor, eps: float = 1e-20) -> Tensor:
    return x / torch.sqrt(torch.clamp((x * x).sum(-1, keepdim=True), min=eps))


def face_and_vertex_normals(v: Tensor, f: Tensor) -> tuple[Tensor, Tensor]:
    """(face normals [F, 3] of length 2 * area, area-weighted unit vertex normals [V, 3]) of
    `v` [V, 3] and int64 `f` [F, 3]; differentiable w.r.t. `v`.

    Vertices touched only by degenerate faces get (0, 0, 1), so every normal is a unit vector.
    Returns the face normals too, so a renderer does not compute them a second time.
    """
    v0, v1, v2 = (gather_rows(v, f[:, k]) for k in range(3))                        # [F, 3] each
    face_n = torch.cross(v1 - v0, v2 - v0, dim=-1)
    acc = torch.zeros_like(v)
    for k in range(3):
        acc = acc.index_add(0, f[:, k], face_n)
    length2 = (acc * acc).sum(-1, keepdim=True)
    acc = torch.where(length2 > 1e-20, acc, device_constant((0.0, 0.0, 1.0), v.dtype, v.device).expand_as(acc))
    return face_n, _safe_normalize(acc)


def compute_vertex_normals(mesh: Mesh) -> Mesh:
    """Area-weighted vertex normals (face_and_vertex_normals); returns a new Mesh with v_nrm and
    t_nrm_idx = t_pos_idx. Differentiable w.r.t. v_pos."""
    _, v_nrm = face_and_vertex_normals(mesh.v_pos, mesh.t_pos_idx)
    return replace(mesh, v_nrm=v_nrm, t_nrm_idx=mesh.t_pos_idx)


def compute_tangents(mesh: Mesh) -> Mesh:
    """Per-vertex tangents from UV derivatives, Gram-Schmidt orthogonalized to the vertex normals.

    Tangents share the normal index buffer (t_tng_idx = t_nrm_idx); normals are computed first
    when absent. Raises MeshError if the mesh has no UVs.
    """
    if mesh.v_tex is None or mesh.t_tex_idx is None:
        raise MeshError("compute_tangents: mesh has no UVs (v_tex/t_tex_idx); tangent frames need "
                        "a UV parameterization - unwrap the mesh first")
    if mesh.v_nrm is None or mesh.t_nrm_idx is None:
        mesh = compute_vertex_normals(mesh)
    f_pos, f_tex, f_nrm = mesh.t_pos_idx, mesh.t_tex_idx, mesh.t_nrm_idx
    p = [mesh.v_pos[f_pos[:, k]] for k in range(3)]             # 3 x [F, 3]
    t = [mesh.v_tex[f_tex[:, k]] for k in range(3)]             # 3 x [F, 2]
    pe1, pe2 = p[1] - p[0], p[2] - p[0]
    te1, te2 = t[1] - t[0], t[2] - t[0]
    denom = te1[:, 0:1] * te2[:, 1:2] - te1[:, 1:2] * te2[:, 0:1]    # [F, 1]
    # Keep the sign of the UV-area, but avoid division by ~0 for degenerate UV triangles.
    denom = torch.where(denom >= 0, denom.clamp(min=1e-6), denom.clamp(max=-1e-6))
    face_tng = (pe1 * te2[:, 1:2] - pe2 * te1[:, 1:2]) / denom         # [F, 3] = dP/du

    acc = torch.zeros_like(mesh.v_nrm)
    for k in range(3):
        acc = acc.index_add(0, f_nrm[:, k], face_tng)
    n = mesh.v_nrm
    tng = acc - (acc * n).sum(-1, keepdim=True) * n
    # A tangent parallel to the normal (or zero) gets any vector perpendicular to the normal.
    fallback = torch.cross(n, torch.where(n[:, :1].abs() < 0.9,
                                          torch.tensor([1.0, 0.0, 0.0], device=n.device).expand_as(n),
                                          torch.tensor([0.0, 1.0, 0.0], device=n.device).expand_as(n)),
                           dim=-1)
    ok = (tng * tng).sum(-1, keepdim=True) > 1e-20
    tng = _safe_normalize(torch.where(ok, tng, fallback))
    return replace(mesh, v_tng=tng, t_tng_idx=f_nrm)


def unit_size(mesh: Mesh) -> Mesh:
    """Centre on the vertex mean and scale so the farthest vertex lies on the unit sphere."""
    centre = mesh.v_pos.mean(dim=0, keepdim=True)               # [1, 3]
    centred = mesh.v_pos - centre
    radius = float(torch.linalg.norm(centred, dim=-1).max())
    if not math.isfinite(radius) or radius <= 0.0:
        raise MeshError(f"unit_size: mesh has zero extent (radius {radius}); cannot scale it")
    # Uniform scale and translation leave normals and tangents unchanged.
    return replace(mesh, v_pos=centred / radius)


def face_component_labels(faces_fx3: np.ndarray, n_verts: int | None = None) -> np.ndarray:
    """Connected-component id per face [F]: faces are connected when they share a vertex index
    (position indices: the surface's parts; UV indices: its UV islands)."""
    n = int(faces_fx3.max()) + 1 if n_verts is None else n_verts
    edges = np.concatenate([faces_fx3[:, [0, 1]], faces_fx3[:, [1, 2]]])        # spans each face
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, vertex_label = connected_components(graph, directed=False)
    return vertex_label[faces_fx3[:, 0]]


@dataclass(frozen=True)
class ComponentFilterReport:
    components: int         # connected components before filtering
    dropped: int            # components removed
    dropped_faces: int      # faces removed


def drop_small_components(mesh: Mesh, min_fraction: float) -> tuple[Mesh, ComponentFilterReport]:
    """Remove connected components (sharing vertices) with fewer than ``min_fraction`` of the faces.

    For a surface extracted by marching tets, small components are floaters: sheets and bubbles
    in regions the cameras barely see (a mug's cavity, the inside of the body), which no view
    constrains. The largest component is always kept. Only positions and faces are kept (attributes
    are computed after filtering); vertices are compacted, order otherwise preserved.
    """
    if not 0.0 <= min_fraction < 1.0:
        raise ValueError(f"min_fraction: expected a fraction in [0, 1), got {min_fraction}")
    faces = mesh.t_pos_idx.detach().cpu().numpy()                               # [F, 3]
    n_verts, n_faces = mesh.v_pos.shape[0], faces.shape[0]
    if n_faces == 0:
        return mesh, ComponentFilterReport(0, 0, 0)
    face_label = face_component_labels(faces, n_verts)                           # [F]
    sizes = np.bincount(face_label)                                              # faces per component
    keep_comp = (sizes >= min_fraction * n_faces) | (sizes == sizes.max())
    keep_face = keep_comp[face_label]
    dropped = int(np.count_nonzero(~keep_comp & (sizes > 0)))
    report = ComponentFilterReport(int(np.count_nonzero(sizes)), dropped, int(np.count_nonzero(~keep_face)))
    return _keep_faces(mesh, faces, keep_face), report


def drop_enclosed_components(mesh: Mesh, min_inside: float = 0.95) -> tuple[Mesh, ComponentFilterReport]:
    """Remove connected components that lie inside the solid bounded by the other components:
    voids or shells within a wall (nothing outside can see them), which marching tets leaves where
    the SDF has a hidden sign change. A component is enclosed when at least `min_inside` of its
    vertices have |generalized winding number| > 0.5 with respect to the rest of the surface
    (libigl). Open cavities (a cup's inside) have winding number ~0 and are kept, and so is the
    largest component, always.
    """
    faces = mesh.t_pos_idx.detach().cpu().numpy()                               # [F, 3]
    if faces.shape[0] == 0:
        return mesh, ComponentFilterReport(0, 0, 0)
    verts = mesh.v_pos.detach().cpu().double().numpy()                          # [V, 3]
    face_label = face_component_labels(faces, verts.shape[0])                    # [F]
    sizes = np.bincount(face_label)                                              # faces per component
    labels = np.flatnonzero(sizes)
    candidates = labels[labels != sizes.argmax()]
    if len(candidates) == 0:
        return mesh, ComponentFilterReport(len(labels), 0, 0)
    enclosed = np.zeros(len(sizes), dtype=bool)
    # Winding numbers add over faces: w(rest) = w(all) - w(own), so the whole surface's tree is
    # built once (one call for every candidate's vertices) and each component's own only once.
    own_faces = [faces[face_label == c] for c in candidates]                     # each: [Fc, 3]
    probes = [np.unique(f) for f in own_faces]                                   # each: its vertex ids
    w_all = igl.fast_winding_number(verts, faces, verts[np.concatenate(probes)])  # [sum P]
    start = 0
    for c, own, used in zip(candidates, own_faces, probes):
        local = np.searchsorted(used, own)                                       # own faces, own vertex ids
        w_rest = w_all[start:start + len(used)] - igl.fast_winding_number(verts[used], local, verts[used])
        start += len(used)
        enclosed[c] = np.mean(np.abs(w_rest) > 0.5) >= min_inside
    keep_face = ~enclosed[face_label]
    report = ComponentFilterReport(len(labels), int(enclosed.sum()), int(np.count_nonzero(~keep_face)))
    return _keep_faces(mesh, faces, keep_face), report


def _keep_faces(mesh: Mesh, faces_fx3: np.ndarray, keep_face: np.ndarray) -> Mesh:
    """The mesh with only the faces `keep_face` [F] (positions and faces; vertices compacted)."""
    if keep_face.all():
        return mesh
    kept = faces_fx3[keep_face]
    used = np.unique(kept)
    remap = np.full(mesh.v_pos.shape[0], -1, dtype=np.int64)
    remap[used] = np.arange(len(used))
    device = mesh.v_pos.device
    v_pos = mesh.v_pos[torch.from_numpy(used).to(device)]
    t_pos_idx = torch.from_numpy(remap[kept]).to(device=device, dtype=mesh.t_pos_idx.dtype)
    return Mesh(v_pos=v_pos, t_pos_idx=t_pos_idx)
