"""Session 10: how far the graphed ops after the rasterizer (render_cuda_graph) are from eager,
against how far eager is from itself (nvdiffrast's antialiasing and backward use atomics).
Prints, per stage and step, max |a - b| / max |b| of the output and of the vertex gradient, and
the vertices where the gradients differ by more than 1e-4 of that scale."""
import sys
from pathlib import Path

import torch
import trimesh

REPO = Path(__file__).resolve().parents[4]
sys.path.insert(0, str(REPO))
from config import load_config  # noqa: E402
from dataset.cameras import azimuth_sector, sample_train_cameras  # noqa: E402
from phases import NormalStageRenderer  # noqa: E402
from render import raster  # noqa: E402
from trainer import camera_options  # noqa: E402


def main(device: torch.device) -> None:
    size = ["train_res=[256,256]", "batch=4"]
    cfg = lambda mode: load_config(REPO / "configs/tiny_cpu_geometry.json", [f"render_cuda_graph={mode}", *size])
    ctx = raster.make_context(device, "nvdiffrast")
    s = trimesh.creation.icosphere(subdivisions=4, radius=0.4)
    base = torch.tensor(s.vertices, dtype=torch.float32, device=device)
    faces = torch.tensor(s.faces, dtype=torch.int64, device=device)
    for stage in ("geometry_coarse", "geometry_fine"):
        graphed, eager = NormalStageRenderer(cfg("on"), ctx), NormalStageRenderer(cfg("off"), ctx)
        gen, dgen = torch.Generator().manual_seed(3), torch.Generator(device=device).manual_seed(3)
        for step in range(3):
            cams = sample_train_cameras(4, azimuth_sector(step, 4), camera_options(cfg("on")), gen, device)
            bumped = base * (1 + 0.1 * torch.rand(base.shape[0], 1, device=device, generator=dgen))
            res = []
            for r in (graphed, eager, eager, graphed):
                v = bumped.clone().requires_grad_(True)
                x = r(v, faces, cams, stage)
                g_out = torch.sin(torch.arange(x.numel(), device=device, dtype=x.dtype).view_as(x))
                (g,) = torch.autograd.grad(x, v, g_out)
                res.append((x.clone(), g))
            ref_x, ref_g = res[1]
            sx, sg = float(ref_x.abs().max()), float(ref_g.abs().max())
            for name, (x, g) in zip(("graph", "eager", "eager2", "graph2"), res):
                bad = ((g - ref_g).abs() > 1e-4 * sg).any(1).nonzero().flatten().tolist()
                print(f"{stage} step {step} {name:6s} vs eager: out {float((x - ref_x).abs().max()) / sx:.2e} "
                      f"grad {float((g - ref_g).abs().max()) / sg:.2e} verts>1e-4: {bad[:12]}")


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="a CUDA device (nvdiffrast and CUDA graphs need one)")
    main(torch.device(ap.parse_args().device))
