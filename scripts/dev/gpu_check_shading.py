"""Time the appearance shading path on a GPU and compare texture_torch with nvdiffrast.

    python scripts/dev/gpu_check_shading.py [--out docs/results/parity/shading.json] [--device cuda]
        [--batch 4] [--res 512] [--cube-res 512] [--encoder auto|torch|triton|tcnn|fourier]

1. Shading: a G-buffer of a unit sphere (batch x res x res, bump mapping on) goes through
   MaterialMLP (hash-grid encoder from geometry/ unless --encoder fourier) -> EnvironmentLight
   (default studio sky, 512^2 cube) -> sRGB; forward + backward timed with CUDA sync, plus
   the parts (material, light.shade) separately and the light construction time.
2. Parity (when nvdiffrast imports): texture_torch vs nvdiffrast.torch.texture on a 2D
   texture and a cube map with linear-mipmap-linear filtering (per-pixel mip_level_bias):
   max / mean abs difference of values and of tex gradients, and the time of both; and
   EnvironmentLight.shade on either texture backend: values and kd / ks / normal gradients.
Prints a table and writes JSON to --out. `--device cpu` with small sizes is a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from geometry.hashgrid import make_encoder as make_hashgrid  # noqa: E402
from render.light import default_environment  # noqa: E402
from render.material import MaterialMLP  # noqa: E402
from render.shading import shade_gbuffer  # noqa: E402
from render.texture_torch import texture_torch  # noqa: E402

# nvdiffrast is GPU-only and optional: without it the parity part is skipped, naming this error.
try:
    import nvdiffrast.torch as _nvdiffrast
    from torch.utils import cpp_extension
except ImportError as _error:
    _nvdiffrast = cpp_extension = None
    _nvdiffrast_missing: str | None = f"nvdiffrast not importable: {_error}"
else:
    _nvdiffrast_missing = None

PUBLISHED_RANGES = dict(kd_min=[0.0, 0.0, 0.0, 0.0], kd_max=[1.0, 1.0, 1.0, 1.0], ks_min=[0.0, 0.08, 0.0],
                        ks_max=[1.0, 1.0, 1.0], nrm_min=[-1.0, -1.0, 0.0], nrm_max=[1.0, 1.0, 1.0])


class FourierEncoder(nn.Module):
    """Cheap stand-in encoder ([N, 3] -> [N, 6 * freqs]) for runs without geometry/."""

    def __init__(self, freqs: int = 6) -> None:
        super().__init__()
        self.register_buffer("scales", 2.0 ** torch.arange(freqs, dtype=torch.float32))
        self.n_output_dims = 6 * freqs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x[:, :, None] * self.scales
        return torch.cat([torch.sin(z), torch.cos(z)], -1).reshape(x.shape[0], -1)


def make_encoder(kind: str, device: torch.device) -> tuple[nn.Module, str]:
    if kind == "fourier":
        return FourierEncoder().to(device), "fourier"
    aabb = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0]], device=device)
    enc = make_hashgrid(aabb, backend=kind)
    return enc, f"hashgrid/{getattr(enc, 'backend', kind)}"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def sphere_gbuffer(batch: int, res: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """Analytic unit-sphere G-buffer (pos, normal, tangent, mask, view_pos), orthographic."""
    lin = torch.linspace(-1.2, 1.2, res, device=device)
    ys, xs = torch.meshgrid(lin, lin, indexing="ij")
    r2 = xs ** 2 + ys ** 2
    mask = (r2 < 1).float()[None, ..., None].expand(batch, res, res, 1)
    z = torch.sqrt((1 - r2).clamp(min=0))
    pos = torch.stack([xs, ys, z], -1)[None].expand(batch, res, res, 3) * mask
    up = torch.tensor([0.0, 0.0, 1.0], device=device)
    nrm = torch.where(mask > 0, pos, up)
    tng = torch.cross(torch.tensor([0.0, 1.0, 0.0], device=device).expand_as(nrm), nrm, dim=-1)
    tng = torch.where(tng.norm(dim=-1, keepdim=True) > 1e-6, tng, torch.tensor([1.0, 0.0, 0.0], device=device))
    view = torch.tensor([[0.0, 0.0, 3.0]], device=device).expand(batch, 3)
    return tuple(t.contiguous() for t in (pos, nrm, tng, mask, view))


def bench_shading(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    t0 = time.perf_counter()
    light = default_environment(res=args.cube_res, device=device)
    sync(device)
    build_s = time.perf_counter() - t0
    encoder, enc_name = make_encoder(args.encoder, device)
    material = MaterialMLP(encoder, **PUBLISHED_RANGES).to(device)
    pos, nrm, tng, mask, view = sphere_gbuffer(args.batch, args.res, device)
    sel = mask[..., 0] > 0
    pts = pos[sel]

    def full() -> None:
        material.zero_grad(set_to_none=True)
        out = shade_gbuffer(pos, nrm, mask, view, material, light, gb_tangent=tng, use_bump=True, mode="pbr")
        out.rgb.mean().backward()

    def material_only() -> None:
        material.zero_grad(set_to_none=True)
        m = material(pts)
        sum(v.mean() for v in m.values()).backward()

    kd = torch.rand(pts.shape[0], 3, device=device, requires_grad=True)
    ks = torch.rand(pts.shape[0], 3, device=device)
    n_sel = nrm[sel]
    v_sel = view.reshape(-1, 1, 1, 3).expand_as(pos)[sel]

    def light_only() -> None:
        light.shade(pts, n_sel, kd, ks, v_sel).mean().backward()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res = {
        "batch": args.batch, "resolution": args.res, "cube_res": args.cube_res, "encoder": enc_name,
        "covered_pixels": int(sel.sum()), "light_build_s": build_s,
        "shade_fwd_bwd": time_ms(full, device, args.iters, args.warmup),
        "material_fwd_bwd": time_ms(material_only, device, args.iters, args.warmup),
        "light_shade_fwd_bwd": time_ms(light_only, device, args.iters, args.warmup),
    }
    if device.type == "cuda":
        res["peak_memory_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return res


def import_nvdiffrast() -> tuple[Any, str | None]:
    """(nvdiffrast.torch, None), or (None, why it is missing)."""
    return _nvdiffrast, _nvdiffrast_missing


def call_nvdiffrast(fn: Callable[..., Any], *a: Any, **kw: Any) -> Any:
    """nvdiffrast's plugin loader misses its build dir on torch >= 2.6 (docs/DESIGN.md, "Backends"): add it, retry."""
    try:
        return fn(*a, **kw)
    except ModuleNotFoundError as exc:
        if not (exc.name or "").startswith("nvdiffrast_plugin"):
            raise
        sys.path.insert(0, cpp_extension._get_build_directory(exc.name, False))
        return fn(*a, **kw)


def compare_texture(dr: Any, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    gen = torch.Generator(device=device).manual_seed(0)
    out: dict[str, Any] = {}
    r = args.res
    cases = {
        "2d": (torch.rand(1, 512, 512, 4, device=device, generator=gen),
               torch.rand(args.batch, r, r, 2, device=device, generator=gen) * 3 - 1, "wrap"),
        "cube": (torch.rand(1, 6, 512, 512, 3, device=device, generator=gen),
                 torch.randn(args.batch, r, r, 3, device=device, generator=gen), "cube"),
    }
    for name, (tex, uv, boundary) in cases.items():
        bias = torch.rand(args.batch, r, r, device=device, generator=gen) * 9.0
        grad_out = torch.randn(args.batch, r, r, tex.shape[-1], device=device, generator=gen)

        def run(fn: Callable[..., torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
            t = tex.clone().requires_grad_(True)
            y = fn(t, uv, mip_level_bias=bias, filter_mode="linear-mipmap-linear", boundary_mode=boundary)
            (y * grad_out).sum().backward()
            return y.detach(), t.grad

        ours_y, ours_g = run(texture_torch)
        nv_y, nv_g = run(lambda *a, **k: call_nvdiffrast(dr.texture, *a, **k))
        out[name] = {
            "value_max_abs": (ours_y - nv_y).abs().max().item(),
            "value_mean_abs": (ours_y - nv_y).abs().mean().item(),
            "tex_grad_max_abs": (ours_g - nv_g).abs().max().item(),
            "tex_grad_rel_l2": ((ours_g - nv_g).norm() / nv_g.norm().clamp(min=1e-12)).item(),
            "torch_fwd_bwd": time_ms(lambda: run(texture_torch), device, args.iters, args.warmup),
            "nvdiffrast_fwd_bwd": time_ms(lambda: run(lambda *a, **k: dr.texture(*a, **k)), device, args.iters, args.warmup),
        }
    return out


def compare_shade(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """light.shade with its texture lookups on the PyTorch reference vs nvdiffrast: values and the
    gradients training uses (kd, ks incl. roughness -> mip level, normals -> cube directions)."""
    light = default_environment(res=args.cube_res, device=device)
    pos, nrm, _, mask, view = sphere_gbuffer(args.batch, args.res, device)
    sel = mask[..., 0] > 0
    gen = torch.Generator(device=device).manual_seed(1)
    pts = pos[sel]
    n = torch.nn.functional.normalize(nrm[sel] + 0.3 * torch.randn(pts.shape, device=device, generator=gen), dim=-1)
    kd = torch.rand(pts.shape, device=device, generator=gen)
    ks = torch.rand(pts.shape, device=device, generator=gen)   # roughness over [0, 1]: every mip level
    v = view.reshape(-1, 1, 1, 3).expand_as(pos)[sel]
    grad_out = torch.randn(pts.shape, device=device, generator=gen)

    def run(backend: str) -> dict[str, torch.Tensor]:
        ins = {"kd": kd.clone().requires_grad_(True), "ks": ks.clone().requires_grad_(True),
               "normal": n.clone().requires_grad_(True)}
        y = light.shade(pts, ins["normal"], ins["kd"], ins["ks"], v, backend=backend)
        (y * grad_out).sum().backward()
        return {"value": y.detach(), **{k: t.grad for k, t in ins.items()}}

    ref, nv = run("torch"), run("nvdiffrast")
    out: dict[str, Any] = {"points": int(pts.shape[0])}
    for key in ref:
        d = (ref[key] - nv[key]).abs()
        out[key] = {"max_abs": d.max().item(), "mean_abs": d.mean().item(),
                    "rel_l2": ((ref[key] - nv[key]).norm() / nv[key].norm().clamp(min=1e-12)).item()}
    out["torch_fwd_bwd"] = time_ms(lambda: run("torch"), device, args.iters, args.warmup)
    out["nvdiffrast_fwd_bwd"] = time_ms(lambda: run("nvdiffrast"), device, args.iters, args.warmup)
    return out


def print_table(result: dict[str, Any]) -> None:
    s = result["shading"]
    print(f"device: {result['device']}  batch {s['batch']} x {s['resolution']}^2, cube {s['cube_res']}^2, "
          f"encoder {s['encoder']}, covered pixels {s['covered_pixels']}")
    print(f"{'part':34s} {'median ms':>10s} {'min ms':>9s}")
    for key in ("shade_fwd_bwd", "material_fwd_bwd", "light_shade_fwd_bwd"):
        print(f"{key:34s} {s[key]['median_ms']:10.2f} {s[key]['min_ms']:9.2f}")
    print(f"{'light construction (s)':34s} {s['light_build_s']:10.2f}")
    if "peak_memory_mib" in s:
        print(f"{'peak memory (MiB)':34s} {s['peak_memory_mib']:10.0f}")
    par = result.get("texture_parity")
    if isinstance(par, dict):
        print(f"{'texture vs nvdiffrast':14s} {'max|dv|':>9s} {'mean|dv|':>9s} {'max|dg|':>9s} {'relL2 g':>9s} {'torch ms':>9s} {'nvdr ms':>9s}")
        for name, p in par.items():
            print(f"{name:14s} {p['value_max_abs']:9.2e} {p['value_mean_abs']:9.2e} {p['tex_grad_max_abs']:9.2e} "
                  f"{p['tex_grad_rel_l2']:9.2e} {p['torch_fwd_bwd']['median_ms']:9.2f} {p['nvdiffrast_fwd_bwd']['median_ms']:9.2f}")
    else:
        print(f"texture parity: {par}")
    shade = result.get("shade_parity")
    if isinstance(shade, dict):
        print(f"{'light.shade torch vs nvdr':26s} {'max abs':>9s} {'mean abs':>9s} {'rel L2':>9s}")
        for key in ("value", "kd", "ks", "normal"):
            p = shade[key]
            print(f"{key:26s} {p['max_abs']:9.2e} {p['mean_abs']:9.2e} {p['rel_l2']:9.2e}")
        print(f"light.shade fwd+bwd ms: torch {shade['torch_fwd_bwd']['median_ms']:.2f}, "
              f"nvdiffrast {shade['nvdiffrast_fwd_bwd']['median_ms']:.2f}")


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "results" / "parity" / "shading.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--cube-res", type=int, default=512)
    ap.add_argument("--encoder", default="auto", choices=["auto", "torch", "triton", "tcnn", "fourier"])
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check_shading: --device cuda but torch.cuda.is_available() is False; pass --device cpu for a smoke run")
    torch.manual_seed(0)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shading": bench_shading(args, device),
    }
    dr, why = import_nvdiffrast()
    if dr is None or device.type != "cuda":
        result["texture_parity"] = why or "skipped: nvdiffrast needs a CUDA device"
    else:
        result["texture_parity"] = compare_texture(dr, args, device)
        result["shade_parity"] = compare_shade(args, device)
    print_table(result)
    write_json(args.out, result)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
