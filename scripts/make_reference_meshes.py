"""Procedural reference meshes for quality measurements with target-mesh guidance.

Usage: ``python scripts/make_reference_meshes.py OUT_DIR [--resolution 128]`` writes

- ``mug.obj``        a mug with a handle: genus 1 (the handle's hole) and a deep concave cavity,
  whose floor the published cameras never see (see ``CUP``);
- ``cup.obj``        the same construction, wide and shallow: a cavity the published cameras see
  entirely, genus 1;
- ``bowl.obj``       a solid puck with a smooth spherical dish in its top: a concave cavity with no
  crease, genus 0;
- ``thin_parts.obj`` a stool: a thin round seat on four thin legs joined by a thin ring;
- ``torus.obj``      a torus lying in the xz plane (genus 1, convex nowhere near the hole);
- ``textured/textured.obj`` (+ ``.mtl``, ``albedo.png``) an egg-shaped body with lat-long UVs and a
  smooth, low-frequency albedo pattern, the target of appearance recovery;
- ``manifest.json``  the files with their vertex/face counts, genus and bounding boxes.

The same shapes are importable (``mug_mesh()``, ``cup_mesh()``, ``bowl_mesh()``, ``thin_parts_mesh()``,
``torus_mesh()``, ``textured_mesh()``, ``write_references(out_dir)``) and return ``trimesh.Trimesh``
objects.

Conventions follow docs/DESIGN.md, "Conventions and formulas": y up, front faces +z, everything
inside the unit sphere so the shapes sit in the default grid box ``[-0.5, 0.5]^3 * mesh_scale`` and
match what ``custom_mesh`` initialization produces. Solid shapes are extracted from analytic signed
distance functions with libigl's marching cubes, so they are closed and consistently oriented
(outward normals); the proportions are chunky enough that a grid-32 DMTet (vertex spacing ~0.1) can
represent the mug.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import igl
import imageio.v3 as iio
import numpy as np
import trimesh

Sdf = Callable[[np.ndarray], np.ndarray]   # [N, 3] points -> [N] signed distance (< 0 inside)

ALBEDO_SIZE = 256


# ----------------------------------------------------------------------------------------------
# Signed distance primitives (exact or conservative; only the zero set matters for extraction)
# ----------------------------------------------------------------------------------------------
def sdf_capped_cylinder_y(p: np.ndarray, radius: float, y0: float, y1: float) -> np.ndarray:
    """Solid cylinder around the y axis between heights y0 < y1."""
    d_radial = np.linalg.norm(p[:, [0, 2]], axis=1) - radius
    half, mid = 0.5 * (y1 - y0), 0.5 * (y1 + y0)
    d_axial = np.abs(p[:, 1] - mid) - half
    outside = np.linalg.norm(np.stack([np.maximum(d_radial, 0), np.maximum(d_axial, 0)], 1), axis=1)
    return outside + np.minimum(np.maximum(d_radial, d_axial), 0.0)


def sdf_torus(p: np.ndarray, major: float, minor: float, axis: str = "y") -> np.ndarray:
    """Torus centred at the origin whose ring lies in the plane normal to `axis`."""
    a = "xyz".index(axis)
    in_plane = [i for i in range(3) if i != a]
    ring = np.linalg.norm(p[:, in_plane], axis=1) - major
    return np.sqrt(ring ** 2 + p[:, a] ** 2) - minor


def sdf_ellipsoid(p: np.ndarray, radii: tuple[float, float, float]) -> np.ndarray:
    """Conservative ellipsoid distance (exact zero set), scaled by the smallest radius."""
    r = np.asarray(radii)
    return (np.linalg.norm(p / r, axis=1) - 1.0) * r.min()


def shifted(sdf: Sdf, offset: tuple[float, float, float]) -> Sdf:
    return lambda p: sdf(p - np.asarray(offset))


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def sdf_to_mesh(sdf: Sdf, lo: float = -1.0, hi: float = 1.0, resolution: int = 128):
    """Zero level set of `sdf` on a cube grid [lo, hi]^3 with `resolution` cells per side ->
    trimesh.Trimesh with outward normals (merged vertices, no degenerate faces)."""
    n = resolution + 1
    axis = np.linspace(lo, hi, n)
    # igl's layout: value index x + y*nx + z*nx*ny, so x varies fastest.
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    grid = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    values = sdf(grid)
    if values.min() >= 0 or values.max() <= 0:
        raise ValueError("sdf_to_mesh: the surface does not cross the grid box; widen [lo, hi]")
    verts, faces, _ = igl.marching_cubes(values, grid, n, n, n, 0.0)
    mesh = trimesh.Trimesh(verts, faces, process=True)
    mesh.update_faces(mesh.nondegenerate_faces())
    mesh.remove_unreferenced_vertices()
    if mesh.volume < 0:  # marching-cubes orientation convention differs between libraries
        mesh.invert()
    return mesh


def centre_bbox(mesh):
    """Translate so the bounding-box centre is at the origin (the init shapes are centred too)."""
    mesh.apply_translation(-mesh.bounds.mean(axis=0))
    return mesh


def genus(mesh) -> int:
    """Genus of a closed, connected, orientable mesh from its Euler characteristic V - E + F = 2 - 2g."""
    chi = len(mesh.vertices) - len(mesh.edges_unique) + len(mesh.faces)
    return (2 - chi) // 2


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------
def mug_sdf(radius: float = 0.5, height: float = 1.1, wall: float = 0.16, bottom: float = 0.18,
            handle_major: float = 0.3, handle_minor: float = 0.09) -> Sdf:
    """Open-top cup around the y axis plus a ring handle on its +x side (ring in the xy plane)."""
    y0, y1 = -0.5 * height, 0.5 * height
    body = lambda p: sdf_capped_cylinder_y(p, radius, y0, y1)                       # noqa: E731
    # The cavity reaches past the rim so the top is open.
    cavity = lambda p: sdf_capped_cylinder_y(p, radius - wall, y0 + bottom, y1 + 1.0)  # noqa: E731
    handle = shifted(lambda p: sdf_torus(p, handle_major, handle_minor, axis="z"), (radius, 0.0, 0.0))
    # Union of body and handle, minus the cavity (which also trims the handle's inner half).
    return lambda p: np.maximum(np.minimum(body(p), handle(p)), -cavity(p))


def mug_mesh(resolution: int = 128):
    """The mug, bounding box centred: about 1.39 x 1.1 x 1.0 (x handle side, y up)."""
    return centre_bbox(sdf_to_mesh(mug_sdf(), resolution=resolution))


# The cup: the mug's shape made wide and shallow enough that the published cameras see all of it.
# From elevation <= 45 degrees (about 41 degrees at the rim, in perspective from radius 3) a cavity
# floor point is visible only if (cavity radius + its distance from the axis) * tan(41) exceeds the
# depth, so the mug's floor (radius 0.34, depth 0.92) is never seen: `scripts/visibility.py` (512
# car cameras) finds 11% of its surface unseen and bounds the IoU a fit to those cameras may end at
# at 0.81. The cup's cavity (radius 0.43, depth 0.45) is seen everywhere (bound 0.97).
CUP = dict(radius=0.55, height=0.6, wall=0.12, bottom=0.15, handle_major=0.2, handle_minor=0.07)


def cup_mesh(resolution: int = 128):
    """A wide cup with a handle, bounding box centred: about 1.37 x 0.6 x 1.1 (handle on +x)."""
    return centre_bbox(sdf_to_mesh(mug_sdf(**CUP), resolution=resolution))


def bowl_sdf(radius: float = 0.6, height: float = 0.5, dish_radius: float = 0.5,
             dish_depth: float = 0.25) -> Sdf:
    """A solid puck around the y axis whose top is hollowed into a smooth spherical dish."""
    y0, y1 = -0.5 * height, 0.5 * height
    body = lambda p: sdf_capped_cylinder_y(p, radius, y0, y1)                       # noqa: E731
    # The sphere through the dish's rim circle (radius dish_radius at y1) and its lowest point.
    rho = (dish_radius ** 2 + dish_depth ** 2) / (2.0 * dish_depth)
    dish = shifted(lambda p: np.linalg.norm(p, axis=1) - rho, (0.0, y1 - dish_depth + rho, 0.0))
    return lambda p: np.maximum(body(p), -dish(p))


# The bowl: a concave cavity with no crease between a wall and a floor. Its surface turns smoothly,
# so the cavity's depth shows in the normals of every pixel that sees it; the cup's flat floor
# meets its wall at a crease, and a floor raised or lowered changes only which pixels are floor or
# wall, which rasterized normals carry no gradient for. From the car
# cameras the dish's lowest point needs elevation >= atan(0.25 / 0.5) ~ 27 degrees; points off
# the axis are seen from lower elevations at the azimuths that put them on the far side.
BOWL = dict(radius=0.6, height=0.5, dish_radius=0.5, dish_depth=0.25)


def bowl_mesh(resolution: int = 128):
    """A puck with a dish in its top, bounding box centred: about 1.2 x 0.5 x 1.2."""
    return centre_bbox(sdf_to_mesh(bowl_sdf(**BOWL), resolution=resolution))


def thin_parts_sdf(seat_radius: float = 0.6, seat_thickness: float = 0.06, leg_radius: float = 0.035,
                   height: float = 1.2, ring_minor: float = 0.025) -> Sdf:
    """A stool: thin disc seat on four thin legs, the legs tied by a thin ring half-way down."""
    top = 0.5 * height
    seat = lambda p: sdf_capped_cylinder_y(p, seat_radius, top - seat_thickness, top)   # noqa: E731
    leg_r = 0.7 * seat_radius
    legs = [shifted(lambda p: sdf_capped_cylinder_y(p, leg_radius, -top, top - 0.5 * seat_thickness),
                    (leg_r * np.cos(a), 0.0, leg_r * np.sin(a)))
            for a in np.pi / 4 + np.arange(4) * np.pi / 2]
    ring = shifted(lambda p: sdf_torus(p, leg_r, ring_minor, axis="y"), (0.0, -0.1 * height, 0.0))

    def sdf(p: np.ndarray) -> np.ndarray:
        d = np.minimum(seat(p), ring(p))
        for leg in legs:
            d = np.minimum(d, leg(p))
        return d
    return sdf


def thin_parts_mesh(resolution: int = 160):
    """The stool; thin parts are 0.05-0.07 thick (resolution 160 puts >= 5 samples across them)."""
    return centre_bbox(sdf_to_mesh(thin_parts_sdf(), resolution=resolution))


def torus_mesh(major: float = 0.6, minor: float = 0.22, sections: int = 96):
    """Parametric torus in the xz plane (axis y), exact vertices on the surface."""
    mesh = trimesh.creation.torus(major_radius=major, minor_radius=minor,
                                  major_sections=sections, minor_sections=sections // 2)
    # trimesh builds it around z; turn it to lie flat (around y, which is up here).
    mesh.apply_transform(trimesh.transformations.rotation_matrix(-np.pi / 2, [1.0, 0.0, 0.0]))
    return mesh


# ----------------------------------------------------------------------------------------------
# Textured reference
# ----------------------------------------------------------------------------------------------
def albedo_pattern(size: int = ALBEDO_SIZE) -> np.ndarray:
    """[size, size, 3] uint8 smooth colour pattern: a few low-frequency sinusoids in u and v.

    Periodic in u (no visible seam at u = 0/1), and constant-ish towards the poles (v = 0/1) where
    lat-long UVs pinch; values stay in [0.15, 0.85] so sRGB round trips never clip.
    """
    v, u = np.meshgrid((np.arange(size) + 0.5) / size, (np.arange(size) + 0.5) / size, indexing="ij")
    pole = np.sin(np.pi * v)  # 0 at the poles, 1 at the equator
    r = 0.5 + 0.35 * pole * np.sin(2 * np.pi * 2 * u)
    g = 0.5 + 0.35 * np.cos(np.pi * 2 * v) * 0.8 + 0.07 * pole * np.cos(2 * np.pi * u)
    b = 0.5 + 0.35 * pole * np.sin(2 * np.pi * (u + v))
    img = np.clip(np.stack([r, g, b], axis=-1), 0.15, 0.85)
    return (img * 255 + 0.5).astype(np.uint8)


def textured_geometry(radii: tuple[float, float, float] = (0.7, 0.85, 0.6), n_lon: int = 64, n_lat: int = 32
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Egg-like ellipsoid with lat-long UVs. Returns (verts [V, 3], uv [V, 2], faces [F, 3]);
    the u = 0/1 seam has duplicated vertices so every vertex has one UV (OBJ origin bottom-left)."""
    lon = np.linspace(0.0, 2 * np.pi, n_lon + 1)                 # seam duplicated: n_lon + 1 columns
    lat = np.linspace(0.0, np.pi, n_lat + 1)                     # 0 = top pole (v = 1)
    lat_g, lon_g = np.meshgrid(lat, lon, indexing="ij")          # [n_lat + 1, n_lon + 1]
    # u = 0 faces the front (+z); the body is a bit wider at the bottom, like an egg.
    swell = 1.0 + 0.12 * np.cos(lat_g)[..., None] * np.array([-1.0, 0.0, -1.0])
    unit = np.stack([np.sin(lat_g) * np.sin(lon_g), np.cos(lat_g), np.sin(lat_g) * np.cos(lon_g)], -1)
    verts = (unit * np.asarray(radii) * swell).reshape(-1, 3)
    uv = np.stack([lon_g / (2 * np.pi), 1.0 - lat_g / np.pi], -1).reshape(-1, 2)
    idx = np.arange((n_lat + 1) * (n_lon + 1)).reshape(n_lat + 1, n_lon + 1)
    a, b = idx[:-1, :-1].ravel(), idx[:-1, 1:].ravel()
    c, d = idx[1:, :-1].ravel(), idx[1:, 1:].ravel()
    faces = np.concatenate([np.stack([a, c, b], 1), np.stack([b, c, d], 1)])
    # Drop the zero-area triangles at the poles (two pole rows of the grid collapse to a point).
    p = verts[faces]
    area = np.linalg.norm(np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0]), axis=1)
    return verts, uv, faces[area > 1e-12]


def write_textured(folder: Path, name: str = "textured") -> Path:
    """OBJ + MTL (map_Kd) + albedo PNG in `folder`; returns the OBJ path."""
    folder.mkdir(parents=True, exist_ok=True)
    verts, uv, faces = textured_geometry()
    iio.imwrite(folder / "albedo.png", albedo_pattern())
    (folder / f"{name}.mtl").write_text(
        "newmtl reference\nKa 0 0 0\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd albedo.png\n")
    lines = [f"mtllib {name}.mtl", "usemtl reference"]
    lines += [f"v {x:.6f} {y:.6f} {z:.6f}" for x, y, z in verts]
    lines += [f"vt {s:.6f} {t:.6f}" for s, t in uv]
    lines += ["f " + " ".join(f"{i + 1}/{i + 1}" for i in tri) for tri in faces]
    path = folder / f"{name}.obj"
    path.write_text("\n".join(lines) + "\n")
    return path


def textured_mesh(folder: Path):
    """Write the textured reference into `folder` and load it back (trimesh, with its texture)."""
    return trimesh.load(str(write_textured(folder)), process=False)


# ----------------------------------------------------------------------------------------------
# All of them
# ----------------------------------------------------------------------------------------------
def _describe(mesh, path: Path) -> dict:
    return {"path": path.name if path.parent.name != "textured" else f"textured/{path.name}",
            "vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces)),
            "watertight": bool(mesh.is_watertight), "genus": int(genus(mesh)) if mesh.is_watertight else None,
            "bounds": np.round(mesh.bounds, 4).tolist()}


def write_references(out_dir: str | Path, resolution: int = 128) -> dict[str, Path]:
    """Write every reference into `out_dir`; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    solids = {"mug": mug_mesh(resolution), "cup": cup_mesh(resolution), "bowl": bowl_mesh(resolution),
              "thin_parts": thin_parts_mesh(max(resolution, 160)), "torus": torus_mesh()}
    paths: dict[str, Path] = {}
    manifest: dict[str, dict] = {}
    for name, mesh in solids.items():
        paths[name] = out / f"{name}.obj"
        mesh.export(paths[name])
        manifest[name] = _describe(mesh, paths[name])
    paths["textured"] = write_textured(out / "textured")
    textured = trimesh.load(str(paths["textured"]), process=False)
    manifest["textured"] = _describe(textured, paths["textured"])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="folder to write the reference meshes into")
    parser.add_argument("--resolution", type=int, default=128,
                        help="marching-cubes cells per side for the SDF shapes (default 128)")
    args = parser.parse_args(argv)
    if args.resolution < 16:
        print(f"error: --resolution must be >= 16, got {args.resolution}", file=sys.stderr)
        return 2
    for name, path in write_references(args.out_dir, args.resolution).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
