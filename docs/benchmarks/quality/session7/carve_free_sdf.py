"""Can normal + mask images alone carve the bowl's dish out of a lid? One free SDF value per grid
vertex (no network, no SDS: plain MSE against the reference's renders, 4 random training cameras per
step over the full circle), started from the reference itself and from the puck without its dish.

    python docs/benchmarks/quality/session7/carve_free_sdf.py GRID RES STEPS    (e.g. 32 128 150)
"""
import sys, time, torch, numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[4]))
from scripts.make_reference_meshes import bowl_sdf, BOWL, sdf_capped_cylinder_y
from geometry.dmtet import tet_grid, tet_topology, marching_tets_padded, marching_tets, SurfaceCapacity
from dataset.cameras import CameraOptions, sample_train_cameras
from render import raster
from render.normal_render import render_normal_mask
grid = int(sys.argv[1]); res = int(sys.argv[2]); steps = int(sys.argv[3])
v, t = tet_grid(grid); v = torch.from_numpy(v).float() * 2.3; t = torch.from_numpy(t); topo = tet_topology(t)
target_sdf = torch.from_numpy(bowl_sdf(**BOWL)(v.double().numpy())).float()
lid = torch.from_numpy(sdf_capped_cylinder_y(v.double().numpy(), 0.6, -0.25, 0.25)).float()
ctx = raster.make_context('cpu', 'torch')
opts = CameraOptions(resolution=(res, res))
cap = SurfaceCapacity(60000, 20000, 60000)
def render(sdf, cams):
    s = marching_tets_padded(v, sdf, t, topo, cap)
    return render_normal_mask(ctx, s.verts, s.faces, cams.mvp, cams.campos, cams.resolution)
def iou(a, b): return float(((a < 0) & (b < 0)).sum() / ((a < 0) | (b < 0)).sum())
dish = (v[:, 1] > 0.0) & (v[:, 1] < 0.25) & (v[:, [0, 2]].norm(dim=1) < 0.4)
g = torch.Generator().manual_seed(0)
for name, init in (("bowl", target_sdf), ("lid", lid)):
    sdf = init.clone().requires_grad_(True); opt = torch.optim.Adam([sdf], lr=0.003); t0 = time.time()
    for i in range(steps):
        cams = sample_train_cameras(4, (-180.0, 180.0), opts, g, 'cpu')
        with torch.no_grad(): tgt = render(target_sdf, cams)
        loss = ((render(sdf, cams) - tgt) ** 2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    sdf = sdf.detach()
    print(name, 'start: dish-region verts filled', int((init[dish] < 0).sum()), '| after', steps, 'steps: vertex IoU', round(iou(sdf, target_sdf), 3), 'dish-region verts filled', int((sdf[dish] < 0).sum()), 'of', int(dish.sum()), '(target filled', int((target_sdf[dish] < 0).sum()), ')', round(time.time() - t0), 's')
