"""`render.mesh.drop_enclosed_components` (the export step `mesh_drop_enclosed`) applied to meshes
exported without it, then evaluated against their references.

    python docs/benchmarks/quality/session8/drop_enclosed_on_meshes.py OUT.json MESH.ply:REF.obj ...
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
from render.mesh import Mesh, drop_enclosed_components  # noqa: E402
from scripts import evaluate as ev  # noqa: E402


def metrics(verts: np.ndarray, faces: np.ndarray, ref: ev.Surface) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mesh.obj"
        trimesh.Trimesh(verts, faces, process=False).export(path)
        out = ev.load_surface(path)
    m = ev.surface_metrics(out, ref, n_samples=100_000)
    return {"chamfer": round(m["chamfer"], 6), "iou": round(ev.volume_iou(out, ref), 4)}


def main() -> None:
    rows = []
    for spec in sys.argv[2:]:
        mesh_path, ref_path = spec.split(":")
        tm = trimesh.load(mesh_path, force="mesh", process=False)
        tm.merge_vertices(merge_tex=True, merge_norm=True)   # UV-seam copies: one surface again
        mesh = Mesh(torch.tensor(np.asarray(tm.vertices), dtype=torch.float32),
                    torch.tensor(np.asarray(tm.faces), dtype=torch.int64))
        kept, report = drop_enclosed_components(mesh)
        ref = ev.load_surface(ref_path)
        row = {"mesh": Path(mesh_path).stem, "components": report.components, "dropped": report.dropped,
               "dropped_faces": report.dropped_faces,
               "before": metrics(mesh.v_pos.numpy(), mesh.t_pos_idx.numpy(), ref),
               "after": metrics(kept.v_pos.numpy(), kept.t_pos_idx.numpy(), ref)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    Path(sys.argv[1]).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
