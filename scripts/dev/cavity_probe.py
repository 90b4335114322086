"""What happens to the SDF where no view constrains it: a geometry run's checkpoints, read region by
region against the target mesh.

    python scripts/dev/cavity_probe.py RUN_DIR TARGET.obj CHECKPOINT... [--out probe.json]

Each CHECKPOINT is a copy of RUN_DIR/checkpoints/last.pt taken while the run trained (e.g. hard
links made as the run replaced it). Grid vertices are split by the target: `solid` (inside it by
more than half a grid cube), `cavity` (outside it, inside its convex hull: a bowl's or cup's hollow)
and `open` (outside the hull). Per checkpoint and region it reports the share of vertices the model
calls solid (`solid`), the share whose |SDF| is under half a grid cube (`near0`: where a small
change makes or removes surface), and the surface's faces there. For the dense hash-grid levels
(whose table rows are lattice points, so they have a place) it reports AdamW's update per row in
units of the learning rate (|m^| / (sqrt(v^) + eps), bias-corrected) and the gradient's RMS
(sqrt(v^)), as medians per region: an unconstrained region whose rows still move at a sizeable
fraction of the learning rate on a vanishing gradient is the optimizer, not the views, shaping it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import igl
import numpy as np
import torch
import trimesh

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from config import Config, build_config  # noqa: E402
from geometry.base import make_geometry  # noqa: E402
from geometry.hashgrid_layout import GridLayout  # noqa: E402
from geometry.sdf_init import mesh_signed_distance  # noqa: E402
from geometry.tet_grid import tet_cell  # noqa: E402
from phases.base import encoder_options  # noqa: E402

REGIONS = ("solid", "cavity", "open")


def region_of(points_nx3: np.ndarray, verts: np.ndarray, faces: np.ndarray, cell: float,
              signed_n: np.ndarray | None = None) -> np.ndarray:
    """[N] int8: 0 solid (inside the target by more than `cell`), 1 cavity (outside, inside the
    convex hull), 2 open (outside the hull); -1 within a cell of the target's surface. `signed_n`:
    the points' signed distance to the target, when the caller has it."""
    s = mesh_signed_distance(points_nx3, verts, faces) if signed_n is None else signed_n
    hull = trimesh.Trimesh(verts, faces, process=False).convex_hull
    in_hull = igl.fast_winding_number(np.asarray(hull.vertices, np.float64), np.asarray(hull.faces, np.int64),
                                      np.ascontiguousarray(points_nx3, np.float64)) > 0.5
    out = np.full(len(points_nx3), -1, np.int8)
    out[s < -cell] = 0
    out[(s > cell) & in_hull] = 1
    out[(s > cell) & ~in_hull] = 2
    return out


def lattice_points(res: int, aabb_2x3: np.ndarray) -> np.ndarray:
    """World positions [(res+1)^3, 3] of a dense level's rows, in the encoder's row order (x fastest)."""
    g = np.arange(res + 1) / res
    z, y, x = np.meshgrid(g, g, g, indexing="ij")
    x01 = np.stack([x.ravel(), y.ravel(), z.ravel()], 1)
    return aabb_2x3[0] + x01 * (aabb_2x3[1] - aabb_2x3[0])


def adam_update(state: dict, lr_eps: tuple[float, float], betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per entry: the bias-corrected update in units of the learning rate, and the gradient RMS."""
    t = float(state["step"])
    m_hat = state["exp_avg"] / (1 - betas[0] ** t)
    rms = (state["exp_avg_sq"] / (1 - betas[1] ** t)).sqrt()
    return m_hat.abs() / (rms + lr_eps[1]), rms


def probe(ckpt: dict, target: tuple[np.ndarray, np.ndarray], cache: dict) -> dict:
    cfg: Config = build_config(ckpt["config"], file_name="the checkpoint")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    phase = ckpt["phase"]
    geo = make_geometry(cfg.geometry, grid_res=phase["grid_res"], mesh_scale=cfg.mesh_scale, backend="auto",
                        encoder_opts=encoder_options(cfg), device=device)
    geo.load_training_state(phase)
    # Half a grid cube: the region margin and near-zero band the committed probe results used.
    cell = tet_cell(geo.grid_res, cfg.mesh_scale) / 2
    key = ("grid", geo.grid_res)
    if key not in cache:
        cache[key] = torch.from_numpy(region_of(geo.grid_verts.cpu().numpy(), *target, cell)).to(device)
    region = cache[key]
    with torch.no_grad():
        sdf, _ = geo.sdf_and_deform()
        verts, faces = geo.extract()
    row: dict = {"it": int(ckpt["it"]), "grid": geo.grid_res, "levels": geo.active_levels, "faces": int(faces.shape[0])}
    centroids = verts[faces].mean(1).cpu().numpy()
    face_region = region_of(centroids, *target, cell) if len(centroids) else np.zeros(0, np.int8)
    for r, name in enumerate(REGIONS):
        sel = region == r
        row[name] = {"vertices": int(sel.sum()), "solid": float((sdf[sel] < 0).float().mean()),
                     "near0": float((sdf[sel].abs() < cell).float().mean()), "faces": int((face_region == r).sum())}
    row["adam"] = dense_level_updates(ckpt, geo, cfg, target, cache)
    return row


def dense_level_updates(ckpt: dict, geo, cfg: Config, target, cache: dict) -> list[dict]:
    """Medians per dense level and region of the table rows' update (lr units) and gradient RMS."""
    opt = ckpt["optimizer"]
    group = opt["param_groups"][0]
    names = [n for n, p in geo.named_parameters() if p.requires_grad]
    table_idx = group["params"][names.index("sdf_net.encoder.table")]
    state = opt["state"].get(table_idx)
    if state is None:
        return []
    update, rms = adam_update(state, (group["lr"], group["eps"]), group["betas"])   # [rows, F]
    update, rms = update.amax(1), rms.amax(1)
    layout = GridLayout.from_options(encoder_options(cfg))
    aabb = geo.aabb.cpu().numpy().astype(np.float64)
    out = []
    for lvl, (res, dense) in enumerate(zip(layout.resolutions, layout.dense)):
        if not dense or lvl >= geo.active_levels:
            continue
        key = ("level", lvl)
        if key not in cache:
            cache[key] = torch.from_numpy(region_of(lattice_points(res, aabb), *target, cfg.mesh_scale / res))
        reg = cache[key].to(update.device)
        rows = slice(layout.offsets[lvl], layout.offsets[lvl] + layout.sizes[lvl])
        u, g = update[rows], rms[rows]
        entry = {"level": lvl, "res": res}
        for r, name in enumerate(REGIONS):
            sel = reg == r
            entry[name] = {"update": float(u[sel].median()), "grad_rms": float(g[sel].median())} if sel.any() else None
        out.append(entry)
    return out


def log_windows(run_dir: Path, its: list[int], width: int = 50) -> dict[int, dict]:
    """Mean loss and faces over the `width` iterations before each checkpoint, from log.jsonl."""
    path = run_dir / "log.jsonl"
    if not path.is_file():
        return {}
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    out = {}
    for it in its:
        win = [r for r in recs if it - width < r["it"] <= it]
        if win:
            out[it] = {"loss": float(np.mean([r["loss"] for r in win])),
                       "log_faces": float(np.mean([r.get("faces", 0) for r in win]))}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("target", type=Path)
    ap.add_argument("checkpoints", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    mesh = trimesh.load(a.target, force="mesh", process=False)
    target = (np.asarray(mesh.vertices, np.float64), np.asarray(mesh.faces, np.int64))
    cache: dict = {}
    rows = []
    for path in a.checkpoints:
        ckpt = torch.load(path, map_location="cuda" if torch.cuda.is_available() else "cpu", weights_only=False)
        rows.append(probe(ckpt, target, cache))
        del ckpt
    rows.sort(key=lambda r: r["it"])
    windows = log_windows(a.run_dir, [r["it"] for r in rows])
    for r in rows:
        r.update(windows.get(r["it"], {}))
    if a.out:
        a.out.write_text(json.dumps(rows, indent=1))
    print(f"{'it':>5} {'faces':>7} {'loss':>9} | cavity: {'solid':>6} {'near0':>6} {'faces':>6} | open: {'solid':>6} "
          f"{'faces':>6} | level, cavity upd / rms ; solid upd / rms")
    for r in rows:
        c, o = r["cavity"], r["open"]
        lv = " ".join(f"L{e['level']} {e['cavity']['update']:.2f}/{e['cavity']['grad_rms']:.1e};"
                      f"{e['solid']['update']:.2f}/{e['solid']['grad_rms']:.1e}"
                      for e in r["adam"] if e["cavity"] and e["solid"])
        print(f"{r['it']:5d} {r['faces']:7d} {r.get('loss', float('nan')):9.4g} | {c['solid']:13.4f} {c['near0']:6.3f} "
              f"{c['faces']:6d} | {o['solid']:12.4f} {o['faces']:6d} | {lv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
