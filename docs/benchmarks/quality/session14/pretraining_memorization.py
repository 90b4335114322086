"""Does the SDF pretraining fit the init shape between its samples? (CPU)

    python docs/benchmarks/quality/session14/pretraining_memorization.py GRID ITERS LEVELS [--pool]

Pretrains the car config's init ellipsoid (scale 0.56 0.56 0.84, mesh_scale 2.3) on a DMTet grid of
GRID with the production hash grid (LEVELS of its 16 levels active) for ITERS steps of 10240
points, then prints the mse of the last 10 batches, the mse on 100k points it never saw, and the
grid vertices whose SDF sign is wrong (all / farther than a grid cell from the surface).
--pool: draw the batches from one fixed 100k-point set, as the pretraining did before session 14.
"""
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(ROOT))

from geometry.dmtet import DMTetGeometry  # noqa: E402
from geometry.sdf_init import InitShape, InitShapeOptions, make_training_samples, pretrain_sdf  # noqa: E402


def main() -> None:
    grid, iters, levels = (int(a) for a in sys.argv[1:4])
    pool = "--pool" in sys.argv
    shape = InitShape(InitShapeOptions("ellipsoid", (0.56, 0.56, 0.84)))
    geo = DMTetGeometry(grid, 2.3, device=torch.device("cpu"))
    geo.sdf_net.set_active_levels(levels)
    start = time.time()
    samples = make_training_samples(shape, 2.3, seed=42) if pool else None
    loss = pretrain_sdf(geo, shape, iters=iters, seed=42, samples=samples)
    unseen_pts, unseen_sdf = make_training_samples(shape, 2.3, seed=7)
    with torch.no_grad():
        fresh_mse = torch.nn.functional.mse_loss(geo.sdf_net(unseen_pts)[0], unseen_sdf).item()
        sdf, _ = geo.sdf_and_deform()
    truth = torch.from_numpy(shape.sdf(geo.grid_verts.double().numpy()))
    wrong = (sdf < 0) != (truth < 0)
    far = truth.abs() > 2.3 / grid
    print(f"grid {grid} iters {iters} levels {levels} {'pool' if pool else 'fresh'}: last-10 mse {loss:.1e}, "
          f"unseen-points mse {fresh_mse:.1e}, wrong-sign grid vertices {int(wrong.sum())} of {len(sdf)} "
          f"({int(wrong[far].sum())} farther than a cell), inside: true {int((truth < 0).sum())} "
          f"net {int((sdf < 0).sum())} ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
