"""Can the SDF network hold a reference when it uses only its k coarsest hash-grid levels?

Direct regression (no rendering, no SDS): the network's SDF is fitted to the reference's signed
distance (libigl) at random points near the surface and in the box, for each k, then the surface
is extracted on the grid-128 tets (car_geometry: mesh_scale 2.3) and evaluated against the
reference. An upper bound on what the coarse stage can hold with `sdf_levels_coarse=k`.

    python docs/benchmarks/quality/session8/levels_capacity.py OUT.json REF.obj [k ...]
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from geometry.dmtet import DMTetGeometry  # noqa: E402
from scripts import evaluate as ev  # noqa: E402


def samples(ref: trimesh.Trimesh, half: float, n: int = 200_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    import igl
    rng = np.random.default_rng(seed)
    surface = ref.sample(n // 2, seed=seed) + rng.normal(scale=0.02, size=(n // 2, 3))
    box = rng.uniform(-half, half, size=(n // 2, 3))
    points = np.concatenate([surface, box])
    sdf = igl.signed_distance(points, np.asarray(ref.vertices, float), np.asarray(ref.faces, np.int64))[0]
    return points.astype(np.float32), sdf.astype(np.float32)


def fit(k: int, points: torch.Tensor, target: torch.Tensor, steps: int = 1500) -> DMTetGeometry:
    torch.manual_seed(0)
    geo = DMTetGeometry(128, 2.3, backend="torch")
    geo.sdf_net.set_active_levels(k)
    opt = torch.optim.Adam(geo.sdf_net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(points), (10_240,), generator=gen)
        loss = torch.nn.functional.mse_loss(geo.sdf_net(points[idx])[0], target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return geo


def main() -> None:
    out_path, ref_path = sys.argv[1], sys.argv[2]
    levels = [int(k) for k in sys.argv[3:]] or [5, 7, 16]
    ref_mesh = trimesh.load(ref_path, force="mesh")
    ref = ev.load_surface(ref_path)
    points, target = (torch.from_numpy(a) for a in samples(ref_mesh, 1.15))
    rows = []
    for k in levels:
        geo = fit(k, points, target)
        with torch.no_grad():
            verts, faces = geo.extract()
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "fit.obj"
            trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False).export(path)
            out = ev.load_surface(path)
        m = ev.surface_metrics(out, ref, n_samples=50_000)
        row = {"levels": k, "chamfer": round(m["chamfer"], 5), "iou": round(ev.volume_iou(out, ref), 4),
               "components": int(len(trimesh.Trimesh(verts.numpy(), faces.numpy()).split(only_watertight=False)))}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(out_path).write_text(json.dumps({"reference": Path(ref_path).name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
