"""Can normal + mask images alone carve the bowl's dish out of a lid? One free SDF value per grid
vertex (no network, no SDS: plain MSE against the reference's renders, 4 random training cameras per
step over the full circle), started from the reference itself and from the puck without its dish.
Optionally with a normal-consistency term (each face's normal against its vertices' mean normals).
Prints the vertex IoU, how many dish-region vertices are still inside, and the top faces' height
and tilt (mean y of their normal, mean |n_xz|) against the reference's.

    python docs/benchmarks/quality/session7/carve_free_sdf.py GRID RES STEPS [NORMAL_WEIGHT]   (e.g. 32 128 150)
"""
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[4]))
from dataset.cameras import CameraOptions, sample_train_cameras  # noqa: E402
from geometry.dmtet import SurfaceCapacity, marching_tets, marching_tets_padded, tet_grid, tet_topology  # noqa: E402
from render import raster  # noqa: E402
from render.normal_render import render_normal_mask  # noqa: E402
from scripts.make_reference_meshes import BOWL, bowl_sdf, sdf_capped_cylinder_y  # noqa: E402

grid, res, steps = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
normal_weight = float(sys.argv[4]) if len(sys.argv) > 4 else 0.0
v, t = tet_grid(grid)
v, t = torch.from_numpy(v).float() * 2.3, torch.from_numpy(t)
topo = tet_topology(t)
target_sdf = torch.from_numpy(bowl_sdf(**BOWL)(v.double().numpy())).float()
lid = torch.from_numpy(sdf_capped_cylinder_y(v.double().numpy(), 0.6, -0.25, 0.25)).float()
ctx = raster.make_context("cpu", "torch")
opts = CameraOptions(resolution=(res, res))
cap = SurfaceCapacity(60000, 20000, 60000)
dish = (v[:, 1] > 0.0) & (v[:, 1] < 0.25) & (v[:, [0, 2]].norm(dim=1) < 0.4)


def face_normals(verts, faces):
    n = torch.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]], dim=1)
    return n / n.norm(dim=1, keepdim=True).clamp_min(1e-12)


def normal_consistency(verts, faces):
    fn = face_normals(verts, faces)
    vn = torch.zeros_like(verts).index_add_(0, faces.reshape(-1), fn.repeat_interleave(3, 0))
    vn = vn / vn.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (1 - (fn[:, None, :] * vn[faces]).sum(-1)).mean()


def render(sdf, cams):
    s = marching_tets_padded(v, sdf, t, topo, cap)
    img = render_normal_mask(ctx, s.verts, s.faces, cams.mvp, cams.campos, cams.resolution)
    return img, s


def iou(a, b):
    return float(((a < 0) & (b < 0)).sum() / ((a < 0) | (b < 0)).sum())


def top_faces(sdf):
    verts, faces = marching_tets(v, sdf, t, topo)
    fn, c = face_normals(verts, faces), verts[faces].mean(1)
    top = (c[:, [0, 2]].norm(dim=1) < 0.35) & (c[:, 1] > -0.05)
    return f"top faces: y {float(c[top, 1].mean()):.3f}, n_y {float(fn[top, 1].mean()):.3f}, |n_xz| {float(fn[top][:, [0, 2]].norm(dim=1).mean()):.3f}"


g = torch.Generator().manual_seed(0)
print(f"grid {grid}, {res}^2, {steps} steps, normal weight {normal_weight}; reference {top_faces(target_sdf)}")
for name, init in (("bowl", target_sdf), ("lid", lid)):
    sdf = init.clone().requires_grad_(True)
    opt = torch.optim.Adam([sdf], lr=0.003)
    t0 = time.time()
    for i in range(steps):
        cams = sample_train_cameras(4, (-180.0, 180.0), opts, g, "cpu")
        with torch.no_grad():
            tgt = render(target_sdf, cams)[0]
        img, s = render(sdf, cams)
        loss = ((img - tgt) ** 2).mean()
        if normal_weight > 0:
            loss = loss + normal_weight * normal_consistency(s.verts, s.faces)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sdf = sdf.detach()
    print(f"{name}: start {int((init[dish] < 0).sum())} of {int(dish.sum())} dish-region vertices inside, after "
          f"{int((sdf[dish] < 0).sum())} (reference {int((target_sdf[dish] < 0).sum())}); vertex IoU "
          f"{iou(sdf, target_sdf):.3f}; {top_faces(sdf)}; {time.time() - t0:.0f} s")
