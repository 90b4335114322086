"""UV unwrapping of full-scale geometry exports whole (max_chunk_faces=0) and in pieces (the default
10,000 faces), with xatlas's timing, chart count and atlas use, on this machine's CPU.

    python scripts/dev/unwrap_pieces.py OUT.json MESH.ply [MESH.ply ...] [--subdivide]

--subdivide also runs each mesh split 1 -> 4 triangles (trimesh), as a stand-in for a grid-256 surface.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from render.mesh import Mesh  # noqa: E402
from render.uv import chart_count, unwrap  # noqa: E402


def uv_area_fraction(mesh: Mesh) -> float:
    """Summed UV triangle area: the fraction of the unit square the charts cover."""
    t = mesh.v_tex[mesh.t_tex_idx].double()                                       # [F, 3, 2]
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    return float((0.5 * (e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]).abs()).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("out")
    p.add_argument("meshes", nargs="+")
    p.add_argument("--subdivide", action="store_true")
    a = p.parse_args()
    rows = []
    for path in a.meshes:
        tm = trimesh.load(path, force="mesh", process=False)
        tm.merge_vertices(merge_tex=True, merge_norm=True)    # the PLY has UV-seam copies: one surface again
        variants = [(Path(path).stem, tm)] + ([(Path(path).stem + "_subdivided", tm.subdivide())] if a.subdivide else [])
        for name, m in variants:
            mesh = Mesh(torch.tensor(np.asarray(m.vertices), dtype=torch.float32),
                        torch.tensor(np.asarray(m.faces), dtype=torch.int64))
            for chunk in (10_000, 0):
                t0 = time.perf_counter()
                out = unwrap(mesh, max_chunk_faces=chunk)
                row = {"mesh": name, "faces": int(mesh.t_pos_idx.shape[0]), "max_chunk_faces": chunk,
                       "seconds": round(time.perf_counter() - t0, 2), "charts": chart_count(out),
                       "uv_area_fraction": round(uv_area_fraction(out), 4)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    Path(a.out).write_text(json.dumps({"cpu_threads": torch.get_num_threads(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
