"""Mesh export: OBJ/MTL (+ PNG texture maps), binary glTF (.glb) and the light probe.

Conventions shared by every writer
- UVs in `Mesh.v_tex` have the OBJ origin (bottom-left); OBJ stores them as they are, glTF
  (origin top-left) gets (u, 1 - v).
- Texture maps (`render.bake.BakedMaps`) are images, row 0 = top, so they are written without
  flipping in both formats.
- kd is linear albedo and is written sRGB-encoded (what OBJ viewers and glTF's baseColorTexture
  expect); ks = (occlusion, roughness, metallic) and the normal map are linear data.
- The normal map is tangent space with our shading's frame: T = dP/du (orthogonalized against
  the vertex normal), B = cross(N, T), texel = n * 0.5 + 0.5. glTF defines B = cross(N, T) * w,
  so the GLB carries our tangents with w = +1 and viewers reproduce our shading.

Geometry-phase output (no material yet): `maps=None` writes the OBJ with its UVs and an MTL with
a plain grey `Kd` and no texture maps, and a GLB with an untextured grey material - no texture
that carries no information is written.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import cv2
import numpy as np
import torch

from render.mesh import Mesh, MeshError, compute_tangents, compute_vertex_normals, validate_mesh

if TYPE_CHECKING:  # only for annotations: exporting needs no rasterizer
    from render.bake import BakedMaps

MATERIAL_NAME = "defaultMat"
TEXTURE_FILES = {"kd": "texture_kd.png", "ks": "texture_ks.png", "nrm": "texture_n.png"}
GEOMETRY_KD = (0.8, 0.8, 0.8)          # plain grey for untextured (geometry-phase) output
GEOMETRY_ROUGHNESS = 0.8

# glTF enums
_FLOAT, _UINT32 = 5126, 5125
_ARRAY_BUFFER, _ELEMENT_ARRAY_BUFFER = 34962, 34963
_LINEAR, _LINEAR_MIPMAP_LINEAR, _CLAMP_TO_EDGE = 9729, 9987, 33071
_GLB_MAGIC, _GLB_JSON, _GLB_BIN = 0x46546C67, 0x4E4F534A, 0x004E4942


class ExportError(RuntimeError):
    """An output could not be written; the message names the file and the reason."""


# ----------------------------------------------------------------------------------------------
# Image encoding


def linear_to_srgb(x: np.ndarray) -> np.ndarray:
    """IEC 61966-2-1 sRGB transfer function, elementwise on values in [0, 1]."""
    return np.where(x <= 0.0031308, 12.92 * x, 1.055 * np.power(np.maximum(x, 0.0031308), 1 / 2.4) - 0.055)


def srgb_to_linear(x: np.ndarray) -> np.ndarray:
    """Inverse of linear_to_srgb."""
    return np.where(x <= 0.04045, x / 12.92, np.power((np.maximum(x, 0.04045) + 0.055) / 1.055, 2.4))


def _to_u8(image_hwc: np.ndarray, name: str) -> np.ndarray:
    """[H, W, C] float in [0, 1] -> uint8, round half up; out-of-range texels are clipped loudly."""
    bad = int(((image_hwc < -1e-4) | (image_hwc > 1 + 1e-4)).any(axis=-1).sum())
    if bad:
        warnings.warn(f"export: {bad} texels of map '{name}' lie outside [0, 1] "
                      f"(range {image_hwc.min():.4g}..{image_hwc.max():.4g}); clipping them for the "
                      "8-bit PNG", RuntimeWarning, stacklevel=3)
    return np.floor(np.clip(image_hwc, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_maps(maps: BakedMaps) -> dict[str, np.ndarray]:
    """BakedMaps -> {"kd", "ks", "nrm", "orm"} uint8 RGB images [H, W, 3] as stored in files.

    "orm" is the glTF packed occlusion/roughness/metallic image. glTF's occlusion is "how much
    light reaches" (1 = unoccluded) while our ks.x is "how much is blocked" (shading multiplies
    by 1 - occlusion), so R = 1 - ks.x; G (roughness) and B (metallic) are ks.y and ks.z as-is.
    """
    kd = maps.kd.detach().float().cpu().numpy()
    ks = maps.ks.detach().float().cpu().numpy()
    nrm = maps.nrm.detach().float().cpu().numpy()
    for name, image in (("kd", kd), ("ks", ks), ("nrm", nrm)):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[:2] != kd.shape[:2]:
            raise ExportError(f"export: map '{name}' must be [H, W, 3] like kd {kd.shape}, "
                              f"got {image.shape}")
        bad = int((~np.isfinite(image)).any(axis=-1).sum())
        if bad:
            raise ExportError(f"export: map '{name}' has {bad} NaN/inf texels; refusing to write it")
    orm = np.concatenate([1.0 - ks[..., :1], ks[..., 1:]], axis=-1)
    return {
        "kd": _to_u8(linear_to_srgb(kd), "kd"),
        "ks": _to_u8(ks, "ks"),
        "nrm": _to_u8(nrm * 0.5 + 0.5, "nrm"),
        "orm": _to_u8(orm, "orm"),
    }


def _png_bytes(image_hw3_u8: np.ndarray, name: str) -> bytes:
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(image_hw3_u8[..., ::-1]))  # OpenCV is BGR
    if not ok:
        raise ExportError(f"export: OpenCV failed to PNG-encode map '{name}' {image_hw3_u8.shape}")
    return buf.tobytes()


def read_png_rgb(path: str | os.PathLike) -> np.ndarray:
    """PNG -> [H, W, 3] uint8 RGB (row 0 = top); for tests and tools reading our maps back."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise FileNotFoundError(f"read_png_rgb: cannot read image '{path}'")
    return image[..., ::-1].copy()


# ----------------------------------------------------------------------------------------------
# OBJ / MTL


def _format_rows(prefix: str, values: np.ndarray, fmt: str) -> str:
    """One OBJ line per row, e.g. 'v 0.1 0.2 0.3'."""
    if values.shape[0] == 0:
        return ""
    row = prefix + " " + " ".join([fmt] * values.shape[1])
    return "\n".join(row % tuple(r) for r in values.tolist()) + "\n"


def _obj_faces(mesh: Mesh) -> str:
    """'f' lines with 1-based v/vt/vn indices for whichever streams the mesh has."""
    streams = [mesh.t_pos_idx]
    has_tex = mesh.t_tex_idx is not None
    has_nrm = mesh.t_nrm_idx is not None
    if has_tex:
        streams.append(mesh.t_tex_idx)
    if has_nrm:
        streams.append(mesh.t_nrm_idx)
    idx_fx3xk = torch.stack([s.detach().cpu().long() for s in streams], dim=-1).numpy() + 1
    if has_tex and has_nrm:
        corner = "%d/%d/%d"
    elif has_tex:
        corner = "%d/%d"
    elif has_nrm:
        corner = "%d//%d"
    else:
        corner = "%d"
    row = "f " + " ".join([corner] * 3)
    flat = idx_fx3xk.reshape(idx_fx3xk.shape[0], -1)
    return "\n".join(row % tuple(r) for r in flat.tolist()) + "\n"


def _mtl_text(textured: bool) -> str:
    if textured:
        # `bsdf pbr` + map_Ks (occlusion, roughness, metallic) + `bump` (tangent-space normal
        # map) is the nvdiffrec / Fantasia3D layout; plain viewers use Kd/map_Kd only.
        return (f"newmtl {MATERIAL_NAME}\n"
                "bsdf pbr\n"
                "Ka 0 0 0\n"
                "Kd 1 1 1\n"
                "Ks 0 0 0\n"
                f"map_Kd {TEXTURE_FILES['kd']}\n"
                f"map_Ks {TEXTURE_FILES['ks']}\n"
                f"bump {TEXTURE_FILES['nrm']}\n")
    kd = " ".join(f"{c:g}" for c in GEOMETRY_KD)
    return ("# Geometry-phase output: shape (and its UV atlas, if unwrapped) only. No texture maps\n"
            "# are written because no appearance has been modelled yet; run the appearance phase.\n"
            f"newmtl {MATERIAL_NAME}\n"
            "Ka 0 0 0\n"
            f"Kd {kd}\n"
            "Ks 0 0 0\n")


def _check_textured(mesh: Mesh, maps: BakedMaps | None, writer: str) -> None:
    if maps is not None and (mesh.v_tex is None or mesh.t_tex_idx is None):
        raise MeshError(f"{writer}: texture maps were given but the mesh has no UVs "
                        "(v_tex/t_tex_idx is None); bake and export the same unwrapped mesh")


def write_obj(folder: str | os.PathLike, mesh: Mesh, maps: BakedMaps | None = None) -> Path:
    """Write folder/mesh.obj + mesh.mtl (+ texture_kd/ks/n.png when `maps` is given).

    Returns the path of mesh.obj. Positions, UVs (OBJ convention) and normals are written with
    their own index streams, so UV seams do not duplicate positions.
    """
    validate_mesh(mesh, "write_obj(mesh)")
    _check_textured(mesh, maps, "write_obj")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if maps is not None:
        images = encode_maps(maps)
        for key, filename in TEXTURE_FILES.items():
            (out / filename).write_bytes(_png_bytes(images[key], key))
    (out / "mesh.mtl").write_text(_mtl_text(textured=maps is not None))

    parts = ["# written by render/export.py\n", "mtllib mesh.mtl\n",
             _format_rows("v", mesh.v_pos.detach().cpu().double().numpy(), "%.7g")]
    if mesh.v_tex is not None:
        parts.append(_format_rows("vt", mesh.v_tex.detach().cpu().double().numpy(), "%.7g"))
    if mesh.v_nrm is not None:
        parts.append(_format_rows("vn", mesh.v_nrm.detach().cpu().double().numpy(), "%.6g"))
    parts += [f"usemtl {MATERIAL_NAME}\n", _obj_faces(mesh)]
    obj_path = out / "mesh.obj"
    obj_path.write_text("".join(parts))
    return obj_path


# ----------------------------------------------------------------------------------------------
# glTF binary


class _BinBuilder:
    """Accumulates the GLB binary chunk and its bufferViews/accessors."""

    def __init__(self) -> None:
        self.blob = bytearray()
        self.buffer_views: list[dict[str, Any]] = []
        self.accessors: list[dict[str, Any]] = []

    def view(self, data: bytes, target: int | None) -> int:
        self.blob.extend(b"\0" * (-len(self.blob) % 4))   # glTF wants 4-byte aligned views
        entry = {"buffer": 0, "byteOffset": len(self.blob), "byteLength": len(data)}
        if target is not None:
            entry["target"] = target
        self.blob.extend(data)
        self.buffer_views.append(entry)
        return len(self.buffer_views) - 1

    def accessor(self, array: np.ndarray, kind: str, target: int, with_bounds: bool = False) -> int:
        component = _UINT32 if array.dtype == np.uint32 else _FLOAT
        view = self.view(np.ascontiguousarray(array).tobytes(), target)
        entry: dict[str, Any] = {"bufferView": view, "componentType": component,
                                 "count": int(array.shape[0]), "type": kind}
        if with_bounds:   # required for POSITION
            entry["min"] = array.min(axis=0).tolist()
            entry["max"] = array.max(axis=0).tolist()
        self.accessors.append(entry)
        return len(self.accessors) - 1


def _unit_rows(x_nx3: np.ndarray) -> np.ndarray:
    """Normalize in float64 so float32 results pass the validator's unit-length check."""
    x = x_nx3.astype(np.float64)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _gltf_vertices(mesh: Mesh, textured: bool) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Split the separate OBJ-style index streams into glTF's single-index vertices.

    Returns ({attribute: [N, C] float32}, indices [F * 3] uint32). Normals come from the mesh or
    are computed (area-weighted, as our renderer does); tangents only for textured output.
    """
    if mesh.v_nrm is None or mesh.t_nrm_idx is None:
        mesh = compute_vertex_normals(mesh)
    if textured and (mesh.v_tng is None or mesh.t_tng_idx is None):
        mesh = compute_tangents(mesh)
    streams = {"POSITION": (mesh.v_pos, mesh.t_pos_idx), "NORMAL": (mesh.v_nrm, mesh.t_nrm_idx)}
    if mesh.v_tex is not None and mesh.t_tex_idx is not None:
        streams["TEXCOORD_0"] = (mesh.v_tex, mesh.t_tex_idx)
    if textured:
        streams["TANGENT"] = (mesh.v_tng, mesh.t_tng_idx)
    corners_cxk = np.stack([idx.detach().cpu().long().reshape(-1).numpy()
                            for _, idx in streams.values()], axis=-1)       # [3F, k]
    unique_nxk, inverse_c = np.unique(corners_cxk, axis=0, return_inverse=True)
    attrs: dict[str, np.ndarray] = {}
    for col, (name, (values, _)) in enumerate(streams.items()):
        attrs[name] = values.detach().cpu().float().numpy()[unique_nxk[:, col]]
    attrs["NORMAL"] = _unit_rows(attrs["NORMAL"])
    if "TEXCOORD_0" in attrs:
        uv = attrs["TEXCOORD_0"]
        attrs["TEXCOORD_0"] = np.stack([uv[:, 0], 1.0 - uv[:, 1]], axis=-1)  # glTF origin top-left
    if "TANGENT" in attrs:
        # w = +1: our shading's bitangent is always cross(N, T), see the module docstring.
        tng = _unit_rows(attrs["TANGENT"])
        attrs["TANGENT"] = np.concatenate([tng, np.ones_like(tng[:, :1])], axis=-1)
    return attrs, inverse_c.reshape(-1).astype(np.uint32)


def _gltf_material(builder: _BinBuilder, maps: BakedMaps | None,
                   doc: dict[str, Any]) -> dict[str, Any]:
    # doubleSided: our rasterizer draws back faces too, and user meshes can be open.
    if maps is None:
        return {"name": "geometry", "doubleSided": True,
                "pbrMetallicRoughness": {"baseColorFactor": [*GEOMETRY_KD, 1.0],
                                         "metallicFactor": 0.0,
                                         "roughnessFactor": GEOMETRY_ROUGHNESS}}
    images = encode_maps(maps)
    doc["samplers"] = [{"magFilter": _LINEAR, "minFilter": _LINEAR_MIPMAP_LINEAR,
                        "wrapS": _CLAMP_TO_EDGE, "wrapT": _CLAMP_TO_EDGE}]
    doc["images"], doc["textures"] = [], []
    for key in ("kd", "orm", "nrm"):
        view = builder.view(_png_bytes(images[key], key), target=None)
        doc["images"].append({"bufferView": view, "mimeType": "image/png", "name": key})
        doc["textures"].append({"sampler": 0, "source": len(doc["images"]) - 1})
    kd_tex, orm_tex, nrm_tex = 0, 1, 2
    return {"name": "baked", "doubleSided": True,
            "pbrMetallicRoughness": {"baseColorTexture": {"index": kd_tex},
                                     "metallicRoughnessTexture": {"index": orm_tex},
                                     "metallicFactor": 1.0, "roughnessFactor": 1.0},
            "occlusionTexture": {"index": orm_tex, "strength": 1.0},
            "normalTexture": {"index": nrm_tex, "scale": 1.0}}


def _glb_bytes(doc: dict[str, Any], blob: bytes) -> bytes:
    json_chunk = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    json_chunk += b" " * (-len(json_chunk) % 4)             # JSON chunk is space-padded
    bin_chunk = bytes(blob) + b"\0" * (-len(blob) % 4)      # BIN chunk is zero-padded
    total = 12 + 8 + len(json_chunk) + 8 + len(bin_chunk)
    return b"".join([struct.pack("<III", _GLB_MAGIC, 2, total),
                     struct.pack("<II", len(json_chunk), _GLB_JSON), json_chunk,
                     struct.pack("<II", len(bin_chunk), _GLB_BIN), bin_chunk])


def write_glb(path: str | os.PathLike, mesh: Mesh, maps: BakedMaps | None = None) -> Path:
    """Write a binary glTF 2.0 file with one mesh and a metallic-roughness material.

    Textured: baseColor = kd (sRGB), metallicRoughness + occlusion = one packed ORM image,
    tangent-space normal map with per-vertex tangents. `maps=None`: plain grey material.
    """
    validate_mesh(mesh, "write_glb(mesh)")
    _check_textured(mesh, maps, "write_glb")
    path = Path(path)
    if path.suffix.lower() != ".glb":
        raise ExportError(f"write_glb: path must end in .glb, got '{path}'")
    builder = _BinBuilder()
    attrs, indices = _gltf_vertices(mesh, textured=maps is not None)
    kinds = {"POSITION": "VEC3", "NORMAL": "VEC3", "TEXCOORD_0": "VEC2", "TANGENT": "VEC4"}
    attributes = {name: builder.accessor(attrs[name], kinds[name], _ARRAY_BUFFER,
                                         with_bounds=name == "POSITION") for name in attrs}
    index_accessor = builder.accessor(indices, "SCALAR", _ELEMENT_ARRAY_BUFFER)
    doc: dict[str, Any] = {"asset": {"version": "2.0", "generator": "render/export.py"},
                           "scene": 0, "scenes": [{"nodes": [0]}],
                           "nodes": [{"mesh": 0, "name": "mesh"}]}
    material = _gltf_material(builder, maps, doc)
    doc["materials"] = [material]
    doc["meshes"] = [{"name": "mesh", "primitives": [{"attributes": attributes,
                                                      "indices": index_accessor,
                                                      "material": 0, "mode": 4}]}]
    doc["accessors"] = builder.accessors
    doc["bufferViews"] = builder.buffer_views
    doc["buffers"] = [{"byteLength": len(builder.blob) + (-len(builder.blob) % 4)}]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_glb_bytes(doc, builder.blob))
    return path


# ----------------------------------------------------------------------------------------------
# Light probe


def write_probe(path: str | os.PathLike, light: Any) -> Path:
    """Save the environment light (as used for shading, i.e. scaled) through its own `save`."""
    save = getattr(light, "save", None)
    if not callable(save):
        raise ExportError(f"write_probe: light must have a save(path) method "
                          f"(render.light.EnvironmentLight), got {type(light).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save(path)
    if not path.is_file():
        raise ExportError(f"write_probe: {type(light).__name__}.save did not create '{path}'")
    return path


# ----------------------------------------------------------------------------------------------
# The formats a run exports: one writer per format, chosen here only. A new format is one function
# `(folder, mesh, maps) -> path written` and its entry.

MeshWriter = Callable[[Path, Mesh, "BakedMaps | None"], Path]


def _write_glb_into(folder: str | os.PathLike, mesh: Mesh, maps: BakedMaps | None = None) -> Path:
    return write_glb(Path(folder) / "mesh.glb", mesh, maps)


MESH_WRITERS: dict[str, MeshWriter] = {
    "obj": write_obj,          # mesh.obj + mesh.mtl (+ texture_kd/ks/n.png): Blender, MeshLab, most tools
    "glb": _write_glb_into,    # mesh.glb, PBR metallic-roughness: web viewers, game engines, Blender
}


def export_mesh(folder: str | os.PathLike, mesh: Mesh, maps: BakedMaps | None = None) -> list[Path]:
    """Write `mesh` (with its baked `maps`, or untextured) into `folder` in every format of
    MESH_WRITERS; the files written, in that order."""
    Path(folder).mkdir(parents=True, exist_ok=True)
    return [write(Path(folder), mesh, maps) for write in MESH_WRITERS.values()]
