"""How well the SDF pretraining fits a detailed custom_mesh with the hash grid cut to its coarse
levels (`sdf_levels_coarse=K`, which also holds during pretraining) against all 16 levels: the
question before `sdf_levels_coarse=5` may become the default for a user's own mesh.

For each mesh and level count: a production SDF network (16 levels, 2^19 entries, torch backend)
on the DMTet grid, `pretrain_sdf` for ITERS steps of 10240 points as the trainer runs it, then the
sign of the network's SDF at the grid's vertices against the mesh's: volumetric IoU over the
vertices, and the vertices farther than a grid cell from the surface that got the wrong sign.

    python docs/benchmarks/quality/session20/pretrain_levels_cpu.py OUT.txt [GRID] [ITERS]
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from geometry.dmtet import DMTetGeometry  # noqa: E402
from geometry.sdf_init import InitShape, InitShapeOptions, pretrain_sdf  # noqa: E402
from scripts.make_reference_meshes import main as make_refs  # noqa: E402

ROOT = Path(__file__).resolve().parents[4]
MESH_SCALE = 2.5            # configs/user_mesh_geometry.json


def fit(mesh: Path, levels: int, grid: int, iters: int) -> str:
    torch.manual_seed(42)
    shape = InitShape(InitShapeOptions("custom_mesh", base_mesh=str(mesh)))
    geo = DMTetGeometry(grid, MESH_SCALE, backend="torch")
    geo.sdf_net.set_active_levels(levels)
    start = time.perf_counter()
    mse = pretrain_sdf(geo, shape, iters=iters, seed=42)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        sdf_v, _ = geo.sdf_and_deform()                          # [V]
    truth_v = torch.from_numpy(shape.sdf(geo.grid_verts.double().numpy()))
    ours, theirs = sdf_v < 0, truth_v < 0
    iou = float((ours & theirs).sum() / (ours | theirs).sum())
    far = truth_v.abs() > MESH_SCALE / grid
    wrong = int((ours != theirs)[far].sum())
    return (f"{mesh.stem:12s} levels {levels:2d}: mse {mse:.2e}, vertex IoU {iou:.4f}, wrong sign farther "
            f"than a cell {wrong:6d} of {int(far.sum())}, {seconds:.0f} s")


def main() -> None:
    out, grid, iters = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 128, \
        int(sys.argv[3]) if len(sys.argv) > 3 else 2000
    refs = out.parent / "refs"
    make_refs([str(refs)])
    meshes = [ROOT / "data/meshes/bunny_like.obj", refs / "thin_parts.obj", refs / "mug.obj"]
    lines = [f"grid {grid}, {iters} pretraining steps, mesh_scale {MESH_SCALE}, seed 42, torch {torch.__version__}"]
    for mesh in meshes:
        for levels in (16, 5):
            lines.append(fit(mesh, levels, grid, iters))
            print(lines[-1], flush=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
