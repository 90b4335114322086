"""Silhouette gradients: the walk (render/silhouette.py) against nvdiffrast's "pixel" antialias.

Per case, d(sum of the antialiased coverage mask)/d(scale) of a mesh scaled about its centre, by
autograd and by a central finite difference of the same quantity; their ratio is the fraction of
the silhouette gradient a method delivers. Cases: icospheres of 80 / 1,280 / 20,480 faces at
256^2 (camera at distance 3, fovy 45 degrees) and DMTet surfaces (marching tets of the signed
distance of data/meshes/bunny_like.obj scaled into the unit sphere, mesh_scale 2.3) at 512^2
(distance 3, fovy 35 degrees).

On a GPU (CUDA; nvdiffrast for "pixel"):
    python scripts/dev/silhouette_check.py
  methods: pixel (nvdiffrast's antialias), walk_torch (the fixed-size PyTorch walk) and
  walk_triton (the Triton kernel); the two walks must record identical edges; ms per antialias
  call (forward + backward, given the rast) at batch 4, 512^2 on the grid-256 surface; and the
  walk replayed from a CUDA graph (render/cuda_graph.py) must equal the eager call.
On the CPU (docs/results/silhouette/README.md):
    python scripts/dev/silhouette_check.py --device cpu --timing-batch 1
  methods: pixel (render/raster_torch.py's copy of nvdiffrast's antialias) and walk_torch.
Smoke test (small images and grids):
    python scripts/dev/silhouette_check.py --device cpu --smoke --out /tmp/silhouette.json

Also reported per case: the longest walk that found an edge (the smallest max_steps that records
every edge MAX_STEPS does), which bounds silhouette.MAX_STEPS.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import trimesh  # noqa: E402

from geometry.marching_tets import marching_tets  # noqa: E402
from geometry.sdf_init import load_unit_mesh, mesh_signed_distance  # noqa: E402
from geometry.tet_grid import tet_grid  # noqa: E402
from render import raster, silhouette  # noqa: E402
from render.cuda_graph import GraphedFunction  # noqa: E402

BUNNY = REPO / "data" / "meshes" / "bunny_like.obj"
MESH_SCALE = 2.3
# The finite difference moves the outermost silhouette point by this many pixels each way: the
# antialiased sum is continuous where every silhouette pair is blended but has kinks (a pixel
# centre crossing the edge, a pair changing edge); over +-2 pixels the central difference averages
# many of them into the smooth trend the gradient predicts. Where a method skips pairs, the sum
# jumps by whole pixels instead, and this difference measures those jumps, which its gradient misses.
FD_PIXELS = 2.0


# ----------------------------------------------------------------------------------------------
# Scenes


def perspective_mvp(distance: float, fovy_deg: float, azimuth_deg: float = 0.0,
                    near: float = 0.5, far: float = 50.0) -> torch.Tensor:
    """[4, 4]: camera on the +z axis at `distance` looking at the origin, the scene turned by
    `azimuth_deg` about y."""
    y = math.tan(math.radians(fovy_deg) / 2)
    proj = torch.tensor([[1 / y, 0, 0, 0], [0, 1 / y, 0, 0],
                         [0, 0, -(far + near) / (far - near), -2 * far * near / (far - near)],
                         [0, 0, -1, 0]], dtype=torch.float32)
    view = torch.eye(4)
    view[2, 3] = -distance
    a = math.radians(azimuth_deg)
    turn = torch.eye(4)
    turn[0, 0], turn[0, 2], turn[2, 0], turn[2, 2] = math.cos(a), math.sin(a), -math.sin(a), math.cos(a)
    return proj @ view @ turn


def icosphere(subdivisions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit icosphere: verts [V, 3] float32, faces [F, 3] int32 (80 * 4^(subdivisions - 1) faces)."""
    s = trimesh.creation.icosphere(subdivisions=subdivisions)
    return torch.tensor(s.vertices, dtype=torch.float32), torch.tensor(s.faces, dtype=torch.int32)


def dmtet_surface(grid: int, mesh_path: Path = BUNNY, mesh_scale: float = MESH_SCALE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Marching tets of a closed mesh's signed distance on the dmtet_grid=`grid` tet grid:
    verts [V, 3] float32, faces [F, 3] int32."""
    mesh_v, mesh_f = load_unit_mesh(mesh_path)
    grid_v, tets = tet_grid(grid)
    grid_v = grid_v.astype(np.float64) * mesh_scale
    sdf = mesh_signed_distance(grid_v, mesh_v, mesh_f)
    verts, faces = marching_tets(torch.from_numpy(grid_v).float(), torch.from_numpy(sdf).float(),
                                 torch.from_numpy(tets))
    return verts, faces.to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Measurements


def antialiased_mask_sum(ctx: raster.RasterContext, verts_vx3: torch.Tensor, tri_fx3: torch.Tensor,
                         mvp_bx4x4: torch.Tensor, resolution: int, method: str, kernel: str = "auto") -> torch.Tensor:
    """0-dim sum of the antialiased coverage mask; method "pixel" or "walk" (kernel: the walk's)."""
    pos = raster.clip_positions(verts_vx3, mvp_bx4x4)
    rast, _ = raster.rasterize(ctx, pos, tri_fx3, (resolution, resolution), grad_db=False)
    mask = (rast[..., 3:] > 0).float()
    return raster.antialias(mask, rast, pos, tri_fx3, backend=ctx, method=method, walk_kernel=kernel).sum()


def fd_step(verts_vx3: torch.Tensor, mvp_bx4x4: torch.Tensor, resolution: int) -> float:
    """Relative scale step that moves the outermost projected vertex by FD_PIXELS pixels."""
    pos = raster.clip_positions(verts_vx3, mvp_bx4x4)
    centre = raster.clip_positions(torch.zeros(1, 3, device=verts_vx3.device), mvp_bx4x4)
    ndc = pos[..., :2] / pos[..., 3:]
    radius_px = float((ndc - centre[..., :2] / centre[..., 3:]).norm(dim=-1).max()) * resolution / 2
    return FD_PIXELS / radius_px


def fd_ratio(ctx: raster.RasterContext, verts_vx3: torch.Tensor, tri_fx3: torch.Tensor, mvp_bx4x4: torch.Tensor,
             resolution: int, method: str, kernel: str = "auto") -> dict[str, float]:
    """{"grad": autograd d(sum)/d(scale) at scale 1, "fd": its central difference, "ratio", "step"}."""
    scale = torch.ones((), device=verts_vx3.device, requires_grad=True)
    value = antialiased_mask_sum(ctx, verts_vx3 * scale, tri_fx3, mvp_bx4x4, resolution, method, kernel)
    (grad,) = torch.autograd.grad(value, scale)
    h = fd_step(verts_vx3, mvp_bx4x4, resolution)
    with torch.no_grad():
        up = antialiased_mask_sum(ctx, verts_vx3 * (1 + h), tri_fx3, mvp_bx4x4, resolution, method, kernel)
        down = antialiased_mask_sum(ctx, verts_vx3 * (1 - h), tri_fx3, mvp_bx4x4, resolution, method, kernel)
    fd = float(up - down) / (2 * h)
    return {"grad": float(grad), "fd": fd, "ratio": float(grad) / fd, "step": h}


def longest_walk(ctx: raster.RasterContext, verts_vx3: torch.Tensor, tri_fx3: torch.Tensor,
                 mvp_bx4x4: torch.Tensor, resolution: int, kernel: str) -> int:
    """The smallest max_steps whose walk records every edge that silhouette.MAX_STEPS records."""
    pos = raster.clip_positions(verts_vx3, mvp_bx4x4)
    rast, _ = raster.rasterize(ctx, pos, tri_fx3, (resolution, resolution), grad_db=False)
    topology = silhouette.silhouette_topology(tri_fx3, verts_vx3.shape[0])

    def edges(steps: int) -> torch.Tensor:
        return silhouette.find_silhouette_edges(rast, pos, tri_fx3, topology, kernel=kernel, max_steps=steps)

    full = edges(silhouette.MAX_STEPS)
    lo, hi = 0, 1                                      # edges(lo) differs (or lo = 0), edges(hi) tested next
    while hi < silhouette.MAX_STEPS and not torch.equal(edges(hi), full):
        lo, hi = hi, min(2 * hi, silhouette.MAX_STEPS)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if torch.equal(edges(mid), full) else (mid, hi)
    return hi


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, iters: int) -> dict[str, float]:
    """Median and minimum wall time of fn() in ms, after one warm-up call."""
    fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - t0))
    return {"median_ms": statistics.median(times), "min_ms": min(times)}


def time_antialias(ctx: raster.RasterContext, verts_vx3: torch.Tensor, tri_fx3: torch.Tensor, batch: int,
                   resolution: int, methods: dict[str, tuple[str, str]], iters: int) -> dict[str, Any]:
    """ms per antialias call (forward + backward of a 4-channel image, the rast given) per method,
    `batch` cameras around the surface; the topology is built once, outside the timing."""
    device = verts_vx3.device
    mvp = torch.stack([perspective_mvp(3.0, 35.0, 360.0 * i / batch) for i in range(batch)]).to(device)
    pos = raster.clip_positions(verts_vx3, mvp).detach().requires_grad_(True)
    rast, _ = raster.rasterize(ctx, pos.detach(), tri_fx3, (resolution, resolution), grad_db=False)
    gen = torch.Generator(device=device).manual_seed(0)
    color = torch.rand(batch, resolution, resolution, 4, device=device, generator=gen).requires_grad_(True)
    weights = torch.rand(color.shape, device=device, generator=gen)
    out: dict[str, Any] = {"batch": batch, "resolution": resolution, "faces": int(tri_fx3.shape[0])}
    for name, (method, kernel) in methods.items():
        topology = raster.antialias_topology(tri_fx3, verts_vx3.shape[0], backend=ctx, method=method)

        def call() -> None:
            image = raster.antialias(color, rast, pos, tri_fx3, backend=ctx, topology=topology, method=method,
                                     walk_kernel=kernel)
            torch.autograd.grad((image * weights).sum(), (color, pos))

        out[name] = time_call(call, device, iters)
    return out


def compare_walk_kernels(ctx: raster.RasterContext, verts_vx3: torch.Tensor, tri_fx3: torch.Tensor, batch: int,
                         resolution: int) -> dict[str, Any]:
    """CUDA: the torch and Triton walks' edges, images and vertex gradients on the same rast."""
    device = verts_vx3.device
    mvp = torch.stack([perspective_mvp(3.0, 35.0, 360.0 * i / batch) for i in range(batch)]).to(device)
    pos = raster.clip_positions(verts_vx3, mvp).detach()
    rast, _ = raster.rasterize(ctx, pos, tri_fx3, (resolution, resolution), grad_db=False)
    topology = silhouette.silhouette_topology(tri_fx3, verts_vx3.shape[0])
    color = (rast[..., 3:] > 0).float().expand(-1, -1, -1, 4).contiguous()
    weights = torch.rand_like(color)
    edges, images, grads = {}, {}, {}
    for kernel in ("torch", "triton"):
        edges[kernel] = silhouette.find_silhouette_edges(rast, pos, tri_fx3, topology, kernel=kernel)
        p = pos.clone().requires_grad_(True)
        images[kernel] = silhouette.blend_silhouettes(color, rast, p, edges[kernel])
        (grads[kernel],) = torch.autograd.grad((images[kernel] * weights).sum(), p)
    scale = float(grads["torch"].abs().max())
    return {"pairs_with_edge": int((edges["torch"][..., 0] >= 0).sum()),
            "pairs_differing": int((edges["torch"] != edges["triton"]).any(-1).sum()),
            "image_max_abs_diff": float((images["torch"] - images["triton"]).abs().max()),
            "grad_max_abs_diff_rel": float((grads["torch"] - grads["triton"]).abs().max()) / max(scale, 1e-30)}


def check_cuda_graph(ctx: raster.RasterContext, verts_vx3: torch.Tensor, tri_fx3: torch.Tensor,
                     resolution: int) -> dict[str, Any]:
    """CUDA: the walk's topology, search and blend captured in a CUDA graph and replayed on a new
    surface position equal the eager call (values and gradients)."""
    device = verts_vx3.device
    mvp = torch.stack([perspective_mvp(3.0, 35.0, a) for a in (0.0, 120.0)]).to(device)
    graphed = GraphedFunction(lambda color, rast, pos, tri, static: raster.antialias(color, rast, pos, tri,
                                                                                       backend=ctx, method="walk"),
                              "walk antialias", "render_cuda_graph")
    result: dict[str, Any] = {}
    for step, s in enumerate((1.0, 1.01)):                  # capture, then replay with moved vertices
        pos = raster.clip_positions(verts_vx3 * s, mvp).detach()
        rast, _ = raster.rasterize(ctx, pos, tri_fx3, (resolution, resolution), grad_db=False)
        color = (rast[..., 3:] > 0).float().expand(-1, -1, -1, 4).contiguous()
        weights = torch.rand_like(color)
        outs, grads = [], []
        for fn in (graphed, None):
            p = pos.clone().requires_grad_(True)
            img = fn(color, rast, p, tri_fx3, static=None) if fn else raster.antialias(color, rast, p, tri_fx3,
                                                                                        backend=ctx, method="walk")
            outs.append(img.clone())
            grads.append(torch.autograd.grad((img * weights).sum(), p)[0])
        result[f"step{step}_image_max_abs_diff"] = float((outs[0] - outs[1]).abs().max())
        result[f"step{step}_grad_max_abs_diff"] = float((grads[0] - grads[1]).abs().max())
    result["captures"] = graphed.captures
    graphed.release()
    return result


# ----------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--subdivisions", type=int, nargs="*", default=[1, 3, 5],
                   help="icospheres (80 * 4^(s - 1) faces)")
    p.add_argument("--sphere-res", type=int, default=256)
    p.add_argument("--grids", type=int, nargs="*", default=[64, 128, 256], help="DMTet surfaces (dmtet_grid)")
    p.add_argument("--dmtet-res", type=int, default=512)
    p.add_argument("--timing-grid", type=int, default=256)
    p.add_argument("--timing-batch", type=int, default=4)
    p.add_argument("--timing-res", type=int, default=512)
    p.add_argument("--timing-iters", type=int, default=10)
    p.add_argument("--smoke", action="store_true",
                   help="small settings: icospheres 1 and 3 at 64^2, DMTet grid 32 at 128^2, timing at 64^2")
    p.add_argument("--out", default=str(REPO / "docs" / "results" / "silhouette" / "silhouette_check.json"))
    args = p.parse_args(argv)
    if args.smoke:
        args.subdivisions, args.sphere_res, args.grids, args.dmtet_res = [1, 3], 64, [32], 128
        args.timing_grid, args.timing_batch, args.timing_res, args.timing_iters = 32, 1, 64, 2
    return args


def _commit() -> str:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True).stdout
    return proc.stdout.strip() + (" (with uncommitted changes)" if dirty.strip() else "")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    ctx = raster.make_context(device, "nvdiffrast" if cuda else "torch")
    methods = {"pixel": ("pixel", "auto"), "walk_torch": ("walk", "torch")}
    if cuda:
        methods["walk_triton"] = ("walk", "triton")
    walk_kernel = "triton" if cuda else "torch"
    env = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
           "raster_backend": ctx.backend, "commit": _commit(),
           "cpu_threads": torch.get_num_threads()}
    if cuda:
        env["gpu"] = torch.cuda.get_device_name(device)
    scenes: list[tuple[str, Callable[[], tuple[torch.Tensor, torch.Tensor]], torch.Tensor, int]] = []
    for s in args.subdivisions:
        scenes.append((f"icosphere_{s}", lambda s=s: icosphere(s), perspective_mvp(3.0, 45.0), args.sphere_res))
    for g in args.grids:
        scenes.append((f"dmtet_grid_{g}", lambda g=g: dmtet_surface(g), perspective_mvp(3.0, 35.0), args.dmtet_res))
    cases = []
    for name, build, mvp, res in scenes:
        verts, faces = build()
        verts, faces, mvp = verts.to(device), faces.to(device), mvp[None].to(device)
        row: dict[str, Any] = {"case": name, "faces": int(faces.shape[0]), "resolution": res}
        for label, (method, kernel) in methods.items():
            row[label] = fd_ratio(ctx, verts, faces, mvp, res, method, kernel)
        row["longest_walk"] = longest_walk(ctx, verts, faces, mvp, res, walk_kernel)
        cases.append(row)
        print(f"{name:16s} faces {row['faces']:7d} {res}^2  " + "  ".join(
            f"{label} {row[label]['ratio']:.3f}" for label in methods) + f"  longest walk {row['longest_walk']}",
            flush=True)
    verts, faces = dmtet_surface(args.timing_grid)
    verts, faces = verts.to(device), faces.to(device)
    timing = time_antialias(ctx, verts, faces, args.timing_batch, args.timing_res, methods, args.timing_iters)
    print("ms per antialias call (forward + backward): " + ", ".join(
        f"{label} {timing[label]['median_ms']:.1f}" for label in methods), flush=True)
    result: dict[str, Any] = {"env": env, "fd_pixels": FD_PIXELS, "max_steps": silhouette.MAX_STEPS,
                              "cases": cases, "timing": timing}
    if cuda:
        result["walk_kernels"] = compare_walk_kernels(ctx, verts, faces, args.timing_batch, args.timing_res)
        result["cuda_graph"] = check_cuda_graph(ctx, verts, faces, args.timing_res)
        print(json.dumps({k: result[k] for k in ("walk_kernels", "cuda_graph")}, indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
