"""Uploaded meshes: limited in size and type, copied under a fixed name into the job's own upload
folder and checked with the project's mesh loader before a job queues.

The uploaded file's name is only ever shown, never used as a path on the server, and a file that
would make the loader read other server files (an OBJ's mtllib, a GLB's external URIs) is cut off
from them or refused.
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from render.mesh import MeshError, load_mesh, validate_mesh

ALLOWED_SUFFIXES = (".obj", ".ply", ".glb", ".stl", ".off")
STORED_NAME = "input_mesh"           # the upload's name inside its job folder, plus its suffix
_GLB_MAGIC, _GLB_JSON = b"glTF", 0x4E4F534A


class UploadError(ValueError):
    """An upload is refused; the message names the uploaded file as the user called it."""


@dataclass(frozen=True)
class UploadLimits:
    max_mb: float = 200.0
    suffixes: tuple[str, ...] = ALLOWED_SUFFIXES

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 2**20)


def shown_name(path: str | Path) -> str:
    """The name to show for an upload: its last path part, printable characters only."""
    name = Path(str(path)).name
    return "".join(ch for ch in name if ch.isprintable())[:120] or "the upload"


def check_type_and_size(src: Path, name: str, limits: UploadLimits) -> str:
    """The upload's lower-case suffix, when its type and size are allowed."""
    suffix = Path(name).suffix.lower()
    if suffix not in limits.suffixes:
        raise UploadError(f"refused upload '{name}': expected a mesh file ({', '.join(limits.suffixes)}), "
                          f"got '{suffix or 'no extension'}'")
    size = src.stat().st_size
    if size > limits.max_bytes:
        raise UploadError(f"refused upload '{name}': {size / 2**20:.1f} MB is over the {limits.max_mb:g} MB "
                          "limit for a mesh")
    return suffix


def _copy_obj_without_material_files(src: Path, dest: Path) -> None:
    """An OBJ alone: its mtllib lines would name files next to it on the server (not uploaded)."""
    with src.open("rb") as fin, dest.open("wb") as fout:
        for line in fin:
            if not line.lstrip().lower().startswith(b"mtllib"):
                fout.write(line)


def _glb_external_uris(path: Path) -> list[str]:
    """URIs in a GLB's JSON chunk that are not embedded data (they would be read from the server)."""
    with path.open("rb") as f:
        header = f.read(20)
        if len(header) < 20 or header[:4] != _GLB_MAGIC:
            return []   # not a GLB container: the mesh loader reports it
        length, kind = struct.unpack("<II", header[12:20])
        if kind != _GLB_JSON:
            return []
        try:
            gltf = json.loads(f.read(length))
        except (ValueError, UnicodeDecodeError):
            return []
    items = [*gltf.get("buffers", []), *gltf.get("images", [])] if isinstance(gltf, dict) else []
    return [i["uri"] for i in items if isinstance(i, dict) and isinstance(i.get("uri"), str)
            and not i["uri"].startswith("data:")]


def store_upload(src: Path, name: str, dest_dir: Path, suffix: str) -> Path:
    """Copy the upload to dest_dir/input_mesh<suffix>."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / f"{STORED_NAME}{suffix}"
    if suffix == ".obj":
        _copy_obj_without_material_files(src, dest)
    else:
        shutil.copyfile(src, dest)
    if suffix == ".glb" and _glb_external_uris(dest):
        raise UploadError(f"refused upload '{name}': the GLB refers to external files; export it with "
                          "everything embedded")
    return dest


def check_mesh(path: Path, name: str) -> None:
    """The project's own checks (render.mesh.load_mesh + validate_mesh), in the upload's name."""
    try:
        validate_mesh(load_mesh(path), name)
    except MeshError as e:
        raise UploadError(f"refused upload: {str(e).replace(str(path), name)}") from None


def accept_upload(src: str | Path, dest_dir: Path, limits: UploadLimits) -> Path:
    """The checked copy of an upload inside dest_dir; UploadError says why one is refused."""
    src = Path(src)
    name = shown_name(src)
    suffix = check_type_and_size(src, name, limits)
    stored = store_upload(src, name, dest_dir, suffix)
    check_mesh(stored, name)
    return stored
