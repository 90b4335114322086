"""What a geometry checkpoint's SDF holds in a reference's cavity: the grid vertices inside the
reference's convex hull but outside its solid (the air a dish holds), against the solid's and the
outside air's. For each checkpoint: how many of them the network puts inside (sdf < 0: surface the
reference lacks), and the size of its SDF there beside the true distance. A cavity whose SDF has
drifted toward zero (|sdf| far below the distance) shows small wiggles as surface on a fine grid;
an SDF that stays a distance there does not (session21/README.md, the grid-256 bowl).

    python docs/benchmarks/quality/session22/cavity_sdf.py REFERENCE.obj CHECKPOINT.pt [CHECKPOINT.pt ...]

Prints one block a checkpoint; runs on CUDA when there is one, else on the CPU.
"""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from geometry.dmtet import DMTetGeometry  # noqa: E402
from scripts import evaluate as ev        # noqa: E402

QUANTILES = [0.05, 0.25, 0.5, 0.75, 0.95]


def load_geometry(path: str, device: torch.device) -> tuple[DMTetGeometry, int]:
    """The checkpoint's SDF network on its grid, at its active levels; and its iteration."""
    state = torch.load(path, map_location=device, weights_only=False)
    if state["config"]["mode"] != "geometry_modeling":
        raise SystemExit(f"error: {path} is a {state['config']['mode']} checkpoint; pass a geometry one")
    phase = state["phase"]
    geo = DMTetGeometry(phase["grid_res"], state["config"]["mesh_scale"], device=device)
    geo.load_state_dict(phase["geometry"])
    geo.sdf_net.set_active_levels(phase["sdf_levels"])
    return geo, int(state["it"])


def regions(ref: ev.Surface, points_nx3: np.ndarray) -> dict[str, np.ndarray]:
    """Masks [N] of the reference's solid, its cavity (hull minus solid) and the air outside the hull."""
    import trimesh
    hull = trimesh.Trimesh(ref.verts, ref.faces, process=False).convex_hull
    in_hull = ev.inside(ev.Surface(np.asarray(hull.vertices, np.float64), np.asarray(hull.faces, np.int64), "hull"),
                        points_nx3)
    solid = ev.inside(ref, points_nx3)
    return {"solid": solid, "cavity": in_hull & ~solid, "outside": ~in_hull}


def describe(ref: ev.Surface, path: str, device: torch.device) -> str:
    geo, it = load_geometry(path, device)
    verts_vx3 = geo.grid_verts.cpu().numpy().astype(np.float64)
    lo, hi = ref.verts.min(0), ref.verts.max(0)
    margin = 2 * geo.mesh_scale / geo.grid_res                      # two cells around the reference's box
    near = np.all((verts_vx3 > lo - margin) & (verts_vx3 < hi + margin), axis=1)
    points = verts_vx3[near]
    with torch.no_grad():
        sdf = geo.sdf_net(torch.from_numpy(points).float().to(device))[0].cpu().numpy().astype(np.float64)
    import igl
    dist = np.sqrt(np.maximum(igl.point_mesh_squared_distance(points, ref.verts, ref.faces)[0], 0.0))
    lines = [f"{Path(path).name}: iteration {it}, grid {geo.grid_res}, {geo.sdf_net.active_levels} levels, "
             f"{near.sum()} grid vertices near the reference"]
    for name, mask in regions(ref, points).items():
        if not mask.any():
            lines.append(f"  {name}: no grid vertex")
            continue
        wrong = (sdf[mask] > 0) if name == "solid" else (sdf[mask] < 0)
        ratio = np.abs(sdf[mask]) / np.maximum(dist[mask], 1e-6)
        lines.append(f"  {name}: {mask.sum()} vertices, wrong sign {wrong.mean():.4f}; |sdf| / distance at "
                     f"quantiles {QUANTILES}: {' '.join(f'{q:.3f}' for q in np.quantile(ratio, QUANTILES))}; "
                     f"sdf {' '.join(f'{q:+.4f}' for q in np.quantile(sdf[mask], QUANTILES))}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref = ev.load_surface(argv[0])
    for path in argv[1:]:
        print(describe(ref, path, device), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
