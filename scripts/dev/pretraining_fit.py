"""How tightly does the SDF pretraining fit the init ellipsoid, by optimizer and step count? (GPU or CPU)

    python scripts/dev/pretraining_fit.py [--seeds 42,7,13] [--backends auto,torch]

The car config's init ellipsoid (scale 0.56 0.56 0.84, mesh_scale 2.3) on a DMTet grid of 128 with the
production hash grid (all 16 levels), 10240 fresh points a step, seeded as a training run seeds it
(torch.manual_seed(seed) before the network is built). Variants:
  adam     torch.optim.Adam defaults (betas 0.9/0.999, eps 1e-8): the pretraining before it moved to AdamW
  adamw    the published optimizer (AdamW, betas 0.9/0.99, eps 1e-15): now the pretraining's
For each: the mse of the last 10 batches after 400 / 1000 / 2000 steps, the mse on 100k points it never
saw, grid vertices with the wrong SDF sign (all / farther than a cell), seconds. Last, the production
pretrain_sdf at its default step count, which must match the adamw row at 2000.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from geometry.dmtet import DMTetGeometry  # noqa: E402
from geometry.sdf_init import (InitShape, InitShapeOptions, make_training_samples, pretrain_sdf,  # noqa: E402
                               sample_sdf_batch)

SHAPE = InitShape(InitShapeOptions("ellipsoid", (0.56, 0.56, 0.84)))
MESH_SCALE, GRID, BATCH, CHECKPOINTS = 2.3, 128, 10_240, (400, 1000, 2000)


def build(seed: int, backend: str, device: torch.device) -> DMTetGeometry:
    torch.manual_seed(seed)
    return DMTetGeometry(GRID, MESH_SCALE, backend=backend, device=device)


def quality(geo: DMTetGeometry) -> str:
    unseen_pts, unseen_sdf = make_training_samples(SHAPE, MESH_SCALE, seed=12345)
    dev = geo.grid_verts.device
    with torch.no_grad():
        held_out = torch.nn.functional.mse_loss(geo.sdf_net(unseen_pts.to(dev))[0], unseen_sdf.to(dev)).item()
        sdf, _ = geo.sdf_and_deform()
    truth = torch.from_numpy(SHAPE.sdf(geo.grid_verts.double().cpu().numpy()))
    wrong = ((sdf.cpu() < 0) != (truth < 0))
    far = truth.abs() > MESH_SCALE / GRID
    return f"held-out {held_out:.1e} wrong-sign {int(wrong.sum())} far {int(wrong[far].sum())}"


def run_variant(seed: int, backend: str, variant: str, device: torch.device) -> str:
    geo = build(seed, backend, device)
    params = [p for p in geo.sdf_net.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=1e-3) if variant == "adam"
           else torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-15))
    rng = np.random.default_rng(seed)
    losses, marks, start = [], [], time.time()
    for it in range(1, CHECKPOINTS[-1] + 1):
        pts, sdf = sample_sdf_batch(SHAPE, MESH_SCALE, BATCH // 10, 4 * BATCH // 10, BATCH - BATCH // 10 - 4 * BATCH // 10, rng)
        loss = torch.nn.functional.mse_loss(geo.sdf_net(torch.from_numpy(pts).float().to(device))[0],
                                            torch.from_numpy(sdf).float().to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
        if it in CHECKPOINTS:
            marks.append(f"{it}: {torch.stack(losses[-10:]).mean().item():.1e}")
            if it == CHECKPOINTS[0]:
                at400 = quality(geo)
    return (f"seed {seed:>2} {backend:<5} {variant:<5} | last-10 mse {', '.join(marks)} | at 400: {at400} | "
            f"at 2000: {quality(geo)} | {time.time() - start:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="42,7,13")
    ap.add_argument("--backends", default="auto,torch")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    backends = args.backends.split(",")
    print(f"# {__doc__.splitlines()[2].strip()}\n# device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
          flush=True)
    for seed in seeds:
        for variant in ("adam", "adamw"):
            print(run_variant(seed, backends[0], variant, device), flush=True)
    for backend in backends[1:]:   # the CPU reference backend on the same device: same convergence?
        for variant in ("adam", "adamw"):
            print(run_variant(seeds[0], backend, variant, device), flush=True)
    for seed in seeds:
        geo = build(seed, backends[0], device)
        start = time.time()
        mse = pretrain_sdf(geo, SHAPE, seed=seed)
        print(f"seed {seed:>2} {backends[0]:<5} production pretrain_sdf (default steps): last-10 mse {mse:.1e} | "
              f"{quality(geo)} | {time.time() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
