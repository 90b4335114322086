"""How visible is a table in the cup to the published cameras' coarse-stage images?

    python scripts/dev/cup_null_space.py [--cameras 64] > cup_mesa_visibility_cpu.txt

Variants of the reference cup (the same SDF construction, the same translation), each compared
with the cup itself through the coarse stage's guidance input (normal + mask latent, 64^2 from
512^2 renders) over published car cameras: the summed squared latent difference, the share of
cameras that see any difference (above 1e-3 in some latent pixel), and the variant's IoU with
the cup. A change that costs IoU but barely changes the images is one the guidance cannot undo.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from config import load_config  # noqa: E402
from dataset.cameras import sample_train_cameras  # noqa: E402
from guidance.base import input_for  # noqa: E402
from phases.base import camera_chunks
from phases.geometry import NormalStageRenderer  # noqa: E402
from render import raster  # noqa: E402
from scripts import evaluate as ev  # noqa: E402
from scripts import make_reference_meshes as refs  # noqa: E402
from trainer import camera_options  # noqa: E402

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "car_geometry.json"


def cup_variant(extra=None, **cup):
    """The cup's mesh with `extra` (an SDF) added, translated as the reference cup is."""
    base = refs.mug_sdf(**{**refs.CUP, **cup})
    sdf = base if extra is None else (lambda p: np.minimum(base(p), extra(p)))
    return refs.sdf_to_mesh(sdf, resolution=128)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cameras", type=int, default=64)
    args = ap.parse_args()
    cyl = refs.sdf_capped_cylinder_y
    floor = -0.3 + refs.CUP["bottom"]                                    # the cavity floor, y = -0.15
    variants = {
        "cup (reference)": cup_variant(),
        "table r 0.28, top +0.10, stem r 0.12": cup_variant(
            lambda p: np.minimum(cyl(p, 0.28, floor + 0.05, floor + 0.10), cyl(p, 0.12, floor - 0.01, floor + 0.05))),
        "mesa r 0.28, top +0.10 (solid to the floor)": cup_variant(lambda p: cyl(p, 0.28, floor - 0.01, floor + 0.10)),
        "floor raised +0.10 (meets the wall)": cup_variant(bottom=refs.CUP["bottom"] + 0.10),
        "floor raised +0.03 (meets the wall)": cup_variant(bottom=refs.CUP["bottom"] + 0.03),
    }
    shift = -variants["cup (reference)"].bounds.mean(axis=0)
    for m in variants.values():
        m.apply_translation(shift)
    cfg = load_config(CONFIG, [])
    ctx = raster.make_context(torch.device("cpu"), "auto")
    render = NormalStageRenderer(cfg, ctx)
    cams = sample_train_cameras(args.cameras, (-180.0, 180.0), camera_options(cfg), torch.Generator().manual_seed(0), "cpu")

    def latents(mesh) -> torch.Tensor:
        v = torch.tensor(np.asarray(mesh.vertices), dtype=torch.float32)
        f = torch.tensor(np.asarray(mesh.faces), dtype=torch.int64)
        with torch.no_grad():
            return torch.cat([render(v, f, c, input_for("geometry_coarse", cfg)) for c in camera_chunks(cams, 8)])   # [N, 4, 64, 64]

    def surface(mesh, name: str) -> ev.Surface:
        return ev.Surface(np.asarray(mesh.vertices, dtype=np.float64), np.asarray(mesh.faces), name)

    lat = {name: latents(mesh) for name, mesh in variants.items()}                  # each [N, 4, 64, 64]
    ref, ref_surf = lat["cup (reference)"], surface(variants["cup (reference)"], "cup")
    print(f"{'variant':45s} {'sum sq. latent diff':>20s} {'cameras seeing it':>18s} {'IoU with the cup':>17s}")
    for name, mesh in variants.items():
        diff = (lat[name] - ref) ** 2                                                 # [N, 4, 64, 64]
        seen = (diff.flatten(1).amax(1) > 1e-3).float().mean()
        iou = ev.volume_iou(surface(mesh, name), ref_surf)
        print(f"{name:45s} {float(diff.sum()):20.3f} {float(seen):18.2f} {iou:17.3f}")

if __name__ == "__main__":
    main()
