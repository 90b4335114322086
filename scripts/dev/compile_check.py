"""The compiled diffusion calls (diffusion_compile) against the plain diffusers calls, stage by stage.

    python scripts/make_tiny_sd.py /tmp/sd21r --full-size
    python scripts/dev/compile_check.py --sd-model /tmp/sd21r --out-dir OUT

Per stage (coarse: batch 4, latents 64x64 into the CFG UNet; fine: batch 4, 512^2 images through
the VAE encoder forward, the UNet and the encoder backward; appearance: the same at batch 3), the
calls as scripts/bench.py's floor makes them (bench.diffusion_calls), in one process, three ways:
eager (the plain diffusers calls), graphed (the UNet replayed from its CUDA graph: what
diffusion_compile=off runs on CUDA; CUDA only) and compiled (diffusion_compile=on, the UNet still
in its CUDA graph). Reported per stage: ms of each (median of --iters synchronized calls), the
compiled/eager and compiled/graphed ratios, the seconds the stage's first compiled call spent
compiling (cold: a fresh inductor cache, unless --cache-dir names one) and, in a second process
with that cache warm, its first call's seconds against the eager first call's (--no-cache-rerun
skips it), peak memory of each way, and parity: the cosine between the compiled path's SDS
gradient w.r.t. the input (the image; the latents for coarse) and eager's, over --draws draws
(same input, posterior sample, t and noise per draw), median and min. Writes
OUT/compile_check.json after every stage (a run cut short keeps what it measured) and prints a
table last, with the targets each stage meets.

Use random weights without --zero-output: a zero-output UNet predicts exactly 0 either way, so the
gradient would check the VAE only (the time is the same as the real weights'). --inductor KEY=VALUE
(repeatable) passes an inductor setting to both compiles, --inductor-vae / --inductor-unet to one,
e.g. --inductor-vae force_layout_optimization=1 (the VAE's graph in channels-last) or
--inductor-vae max_autotune=1. --profile K adds, per stage and way, the K kernels with the most
device time per call and that time summed by kind (convolution and matmul libraries, Triton, the
rest): where a stage's time goes, and what a fusion could still save (on CPU: operators' self time).
--cudnn-benchmark lets cuDNN time its algorithms for each convolution shape (PyTorch's default picks
them by heuristics) for every way in this process. cuDNN keeps one plan per shape whichever way
chose it, so the comparison is two processes: one with the flag, one without.
`--device cpu --sd-model TINY --resolution 64 --batch 2 --backend aot_eager` is the smoke test
(capture and autograd without code generation: seconds). --flops adds each way's arithmetic rate:
the SD 2.1-base architecture's FLOP count of the stage's calls (torch.utils.flop_counter on meta
tensors) over its time, so it means something with the full-size model only.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import sd  # noqa: E402
from scripts.bench import diffusion_calls, timed  # noqa: E402
from scripts.make_tiny_sd import SD21_BASE, build_tiny_sd, unet_model, vae_model  # noqa: E402

# stage -> (sd.py's stage name, batch of the shipped configs)
STAGES = {"coarse": ("geometry_coarse", 4), "fine": ("geometry_fine", 4), "appearance": ("appearance", 3)}
COARSE_ITER = 1000
# Targets of the compiled path; the ratio targets are for the training step (scripts/bench.py's
# ratio_median_to_eager_floor), so the table shows the calls' own ratio without judging it.
MIN_COSINE, MAX_COMPILE_S, MAX_CACHED_START_S, MAX_PEAK_GIB = 0.999, 90.0, 15.0, 20.0

Runners = tuple[Callable[..., torch.Tensor], Callable[..., torch.Tensor]]   # (vae_runner, unet_runner)


def parse_inductor_options(items: list[str]) -> dict[str, Any]:
    """KEY=VALUE items -> inductor settings; values read as JSON (1, true, "x"), else kept as text."""
    options: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--inductor: expected KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(raw)
        except json.JSONDecodeError:
            options[key] = raw
    return options


@contextlib.contextmanager
def using(guidance: sd.StableDiffusionGuidance, runners: Runners) -> Iterator[None]:
    """The guidance's two diffusion calls replaced by `runners` inside the block."""
    saved = guidance.vae_runner, guidance.unet_runner
    guidance.vae_runner, guidance.unet_runner = runners
    try:
        yield
    finally:
        guidance.vae_runner, guidance.unet_runner = saved


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def first_call_s(fn: Callable[[], None], device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return round(time.perf_counter() - start, 3)


def sds_gradient(guidance: sd.StableDiffusionGuidance, stage: str, inputs: torch.Tensor, seed: int) -> torch.Tensor:
    """The SDS gradient w.r.t. `inputs` [B, C, H, W] of one draw (its generator seeded with `seed`), flattened fp64."""
    x = inputs.detach().clone().requires_grad_(True)
    gen = torch.Generator(device=inputs.device).manual_seed(seed)
    it = COARSE_ITER + 1 if stage == "geometry_fine" else 1
    guidance.sds(x, stage, it, generator=gen).loss.backward()
    return x.grad.double().flatten()


def parity(guidance: sd.StableDiffusionGuidance, eager: Runners, compiled: Runners, name: str, batch: int,
           draws: int, device: torch.device) -> dict[str, Any]:
    """Cosine and relative L2 error of the compiled path's SDS gradient against eager's, per draw."""
    stage = STAGES[name][0]
    shape = guidance.latent_shape(batch) if name == "coarse" else (batch, 3, guidance.opts.image_resolution,
                                                                      guidance.opts.image_resolution)
    gen = torch.Generator(device=device).manual_seed(1234)
    inputs = torch.rand(shape, generator=gen, device=device)
    if name == "coarse":
        inputs = inputs * 2.0 - 1.0                  # normal xyz and mask in [-1, 1], as the coarse render
    cosines, errors = [], []
    for k in range(draws):
        with using(guidance, eager):
            ref = sds_gradient(guidance, stage, inputs, k)
        with using(guidance, compiled):
            got = sds_gradient(guidance, stage, inputs, k)
        cosines.append(float(torch.dot(ref, got) / (ref.norm() * got.norm())))
        errors.append(float((got - ref).norm() / ref.norm()))
    return {"draws": draws, "cos_median": round(statistics.median(cosines), 6), "cos_min": round(min(cosines), 6),
            "rel_l2_median": round(statistics.median(errors), 6), "rel_l2_max": round(max(errors), 6)}


# Kernel-name fragments -> kind, for --profile's sums (first match wins; cuDNN and cuBLAS kernels carry
# these in their names on Hopper: sm90_xmma, cutlass, implicit_gemm, ...).
KERNEL_KINDS = (("triton", "triton"), ("conv", "conv/gemm"), ("gemm", "conv/gemm"), ("xmma", "conv/gemm"),
                ("cutlass", "conv/gemm"), ("cudnn", "conv/gemm"), ("flash", "attention"), ("fmha", "attention"))


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for frag, kind in KERNEL_KINDS if frag in low), "other")


def kernel_profile(call: Callable[[], None], device: torch.device, calls: int, top: int) -> dict[str, Any]:
    """Device ms per call of `call`'s kernels over `calls` calls: the `top` largest and the sums by kind."""
    activity = ProfilerActivity.CUDA if device.type == "cuda" else ProfilerActivity.CPU
    call()
    sync(device)
    with profile(activities=[activity]) as prof:
        for _ in range(calls):
            call()
        sync(device)
    rows = []
    for evt in prof.key_averages():
        us = evt.self_device_time_total if device.type == "cuda" else evt.self_cpu_time_total
        if us > 0 and (device.type != "cuda" or evt.device_type == torch.autograd.DeviceType.CUDA):
            rows.append({"kernel": evt.key[:120], "kind": kernel_kind(evt.key), "ms": round(us / 1e3 / calls, 3),
                         "count": round(evt.count / calls, 2)})
    rows.sort(key=lambda r: -r["ms"])
    kinds: dict[str, float] = {}
    for r in rows:
        kinds[r["kind"]] = round(kinds.get(r["kind"], 0.0) + r["ms"], 3)
    return {"calls": calls, "total_ms": round(sum(r["ms"] for r in rows), 3), "by_kind": kinds, "top": rows[:top]}


def stage_tflop(name: str, batch: int, resolution: int) -> float:
    """TFLOP of one step's diffusion calls of stage `name` with the SD 2.1-base architecture, counted
    on meta tensors (no weights, no device): the UNet's classifier-free-guidance forward on 2B rows,
    and for fine and appearance the VAE encoder's forward and its backward to the image (the frozen
    weights get no gradient)."""
    with torch.device("meta"):
        unet, vae = unet_model(SD21_BASE).half(), vae_model(SD21_BASE).half()
    for p in [*unet.parameters(), *vae.parameters()]:
        p.requires_grad_(False)
    side = resolution // 8
    emb = torch.zeros(2 * batch, 77, SD21_BASE["text_width"], device="meta", dtype=torch.half)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(torch.zeros(2 * batch, 4, side, side, device="meta", dtype=torch.half),
             torch.zeros(2 * batch, device="meta"), encoder_hidden_states=emb)
        if name != "coarse":
            img = torch.zeros(batch, 3, resolution, resolution, device="meta", dtype=torch.half, requires_grad=True)
            vae.encode(img).latent_dist.parameters.sum().backward()
    return counter.get_total_flops() / 1e12


def measure_stage(guidance: sd.StableDiffusionGuidance, ways: dict[str, Runners], name: str, batch: int,
                  args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    row: dict[str, Any] = {"batch": batch}
    with using(guidance, ways["eager"]):
        row["eager_first_call_s"] = first_call_s(diffusion_calls(guidance, name, batch, device), device)
    before = set(guidance.compile_seconds())
    with using(guidance, ways["compiled"]):
        row["compiled_first_call_s"] = first_call_s(diffusion_calls(guidance, name, batch, device), device)
    row["compile_s"] = round(sum(s for k, s in guidance.compile_seconds().items() if k not in before), 3)
    row["compiles"] = {k: s for k, s in guidance.compile_seconds().items() if k not in before}
    failures = [c.failure for c in guidance.compiled_calls if c.failure]
    if failures:
        row["compile_failures"] = failures
    if args.compile_only:
        return row
    for way, runners in ways.items():
        with using(guidance, runners):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            ms = timed(diffusion_calls(guidance, name, batch, device), device, args.iters, args.warmup)
            row[f"{way}_ms"] = round(statistics.median(ms), 3)
            if device.type == "cuda":
                row[f"{way}_peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    if args.flops:   # arithmetic rate each way reaches (the architecture's count, whatever --sd-model is)
        row["tflop"] = round(stage_tflop(name, batch, args.resolution), 3)
        for way in ways:
            row[f"{way}_tflop_per_s"] = round(row["tflop"] / (row[f"{way}_ms"] / 1e3), 1)
    row["ratio"] = round(row["compiled_ms"] / row["eager_ms"], 3)
    if "graphed_ms" in row:
        row["ratio_to_graphed"] = round(row["compiled_ms"] / row["graphed_ms"], 3)
    row["parity"] = parity(guidance, ways["eager"], ways["compiled"], name, batch, args.draws, device)
    if args.profile:
        row["profile"] = {}
        for way, runners in ways.items():
            with using(guidance, runners):
                row["profile"][way] = kernel_profile(diffusion_calls(guidance, name, batch, device), device,
                                                     args.iters, args.profile)
    return row


def cached_rerun(args: argparse.Namespace, cache: Path, out_dir: Path) -> dict[str, Any]:
    """The first calls again in a fresh process, with the inductor cache this run filled."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--compile-only", "--no-cache-rerun",
           "--sd-model", args.sd_model, "--out-dir", str(out_dir), "--cache-dir", str(cache), "--device", args.device,
           "--resolution", str(args.resolution), "--backend", args.backend, "--stages", *args.stages,
           *(["--batch", str(args.batch)] if args.batch else []),
           *(["--cudnn-benchmark"] if args.cudnn_benchmark else []),
           *[x for flag in ("inductor", "inductor_vae", "inductor_unet") for item in getattr(args, flag)
             for x in ("--" + flag.replace("_", "-"), item)]]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": f"exit {proc.returncode}: {proc.stderr[-2000:]}"}
    result = json.loads((out_dir / "compile_check.json").read_text())
    result["process_s"] = round(time.perf_counter() - start, 3)
    return result


def checks(row: dict[str, Any]) -> dict[str, bool]:
    out = {"compile_s": row["compile_s"] <= MAX_COMPILE_S and not row.get("compile_failures")}
    if "parity" in row:
        out["parity"] = row["parity"]["cos_median"] >= MIN_COSINE
    if "cached_start_over_eager_s" in row:
        out["cached_start"] = row["cached_start_over_eager_s"] <= MAX_CACHED_START_S
    if "compiled_peak_gib" in row:
        out["peak"] = row["compiled_peak_gib"] <= MAX_PEAK_GIB
    return out


def table(stages: dict[str, dict[str, Any]]) -> str:
    def num(row: dict[str, Any], key: str, fmt: str = ".1f") -> str:
        value = row.get(key)
        return "-" if value is None else format(value, fmt)
    # warm s: the compiled first call's seconds past the eager one's, in a process with the cache warm.
    lines = [f"{'stage':<11} {'batch':>5} {'eager ms':>9} {'graphed':>8} {'compiled':>9} {'ratio':>6} {'compile s':>9} "
             f"{'warm s':>8} {'peak GiB':>9} {'cos med':>8} {'cos min':>8}  checks"]
    for name, row in stages.items():
        p = row.get("parity", {})
        peak = f"{num(row, 'eager_peak_gib')}/{num(row, 'compiled_peak_gib')}"
        failed = [k for k, ok in row["checks"].items() if not ok]
        lines.append(f"{name:<11} {row['batch']:>5} {num(row, 'eager_ms'):>9} {num(row, 'graphed_ms'):>8} "
                     f"{num(row, 'compiled_ms'):>9} {num(row, 'ratio', '.3f'):>6} {row['compile_s']:>9.1f} "
                     f"{num(row, 'cached_start_over_eager_s'):>8} {peak:>9} {p.get('cos_median', float('nan')):>8.5f} "
                     f"{p.get('cos_min', float('nan')):>8.5f}  {'FAIL ' + ','.join(failed) if failed else 'ok'}")
    return "\n".join(lines)


def profile_lines(stages: dict[str, dict[str, Any]]) -> str:
    """--profile's summary: per stage and way, kernel ms per call by kind and the 8 largest kernels."""
    lines = []
    for name, row in stages.items():
        for way, prof in row.get("profile", {}).items():
            kinds = ", ".join(f"{k} {v:.1f}" for k, v in prof["by_kind"].items())
            lines.append(f"{name} {way}: kernels {prof['total_ms']:.1f} ms per call ({kinds})")
            lines += [f"    {r['ms']:7.2f} ms x{r['count']:<5g} {r['kernel'][:90]}" for r in prof["top"][:8]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sd-model", required=True,
                    help="SD-format model folder (built with the full-size architecture and random weights if missing)")
    ap.add_argument("--out-dir", required=True, help="folder for compile_check.json")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", nargs="+", choices=tuple(STAGES), default=list(STAGES))
    ap.add_argument("--batch", type=int, default=None, help="one batch for every stage (default: 4, 4, 3)")
    ap.add_argument("--resolution", type=int, default=512, help="image side (latents: side / 8)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--draws", type=int, default=20, help="parity draws per stage")
    ap.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: a quick smoke run)")
    ap.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                    help="an inductor setting for both compiles (repeatable)")
    ap.add_argument("--inductor-vae", action="append", default=[], metavar="KEY=VALUE",
                    help="an inductor setting for the VAE encoder's compile only (repeatable)")
    ap.add_argument("--inductor-unet", action="append", default=[], metavar="KEY=VALUE",
                    help="an inductor setting for the UNet's compile only (repeatable)")
    ap.add_argument("--cache-dir", default=None, help="inductor cache folder (default: a fresh one: a cold compile)")
    ap.add_argument("--no-cache-rerun", action="store_true", help="skip the second process with the cache warm")
    ap.add_argument("--compile-only", action="store_true", help="only the first calls (what the rerun measures)")
    ap.add_argument("--cudnn-benchmark", action="store_true",
                    help="torch.backends.cudnn.benchmark on for the whole process (compare with a run without)")
    ap.add_argument("--flops", action="store_true",
                    help="also each way's TFLOP/s: the full-size architecture's FLOP count over its ms")
    ap.add_argument("--profile", type=int, default=0, metavar="K",
                    help="per stage and way: the K kernels with the most device time per call, and sums by kind")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="compile_check_cache_"))
    os.environ[sd.COMPILE_CACHE_ENV] = str(cache)       # before the first compile; sd.compile_cache_dir() keeps it
    sd.COMPILE_BACKEND = args.backend
    both = parse_inductor_options(args.inductor)
    sd.COMPILE_OPTIONS["VAE encoder"].update({**both, **parse_inductor_options(args.inductor_vae)})
    sd.COMPILE_OPTIONS["UNet"].update({**both, **parse_inductor_options(args.inductor_unet)})
    model = Path(args.sd_model)
    if not (model / "model_index.json").exists():
        build_tiny_sd(model, full_size=True)
    opts = sd.GuidanceOptions(sd_model=str(model), text="a red car", image_resolution=args.resolution,
                              coarse_iter=COARSE_ITER, diffusion_compile="on")
    guidance = sd.StableDiffusionGuidance(opts, device)
    ways: dict[str, Runners] = {"eager": (guidance.eager_vae_moments, guidance.eager_unet)}
    if device.type == "cuda" and not args.compile_only:
        ways["graphed"] = (guidance.eager_vae_moments, sd.CudaGraphUNet(guidance.eager_unet))
    ways["compiled"] = (guidance.vae_runner, guidance.unet_runner)

    conv_out = guidance.unet.conv_out.weight
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__, "sd_model": str(model), "resolution": args.resolution,
        "unet_zero_output": bool(conv_out.abs().max() == 0), "backend": args.backend,
        "cudnn_benchmark": args.cudnn_benchmark,
        "inductor_options": {call: dict(options) for call, options in sd.COMPILE_OPTIONS.items()},
        "cache_dir": str(cache),
        "unet": "cuda_graph" if isinstance(guidance.unet_runner, sd.CudaGraphUNet) else "eager",
        "targets": {"cos_median_min": MIN_COSINE, "compile_s_max": MAX_COMPILE_S,
                    "cached_start_over_eager_s_max": MAX_CACHED_START_S, "peak_gib_max": MAX_PEAK_GIB},
        "stages": {}}
    stages: dict[str, dict[str, Any]] = result["stages"]
    out_file = out_dir / "compile_check.json"
    for name in args.stages:
        start = time.perf_counter()
        stages[name] = row = measure_stage(guidance, ways, name, args.batch or STAGES[name][1], args, device)
        row["checks"] = checks(row)
        out_file.write_text(json.dumps(result, indent=2) + "\n")
        print(f"{name}: {time.perf_counter() - start:.1f} s {json.dumps(row)}", file=sys.stderr, flush=True)
    if not (args.no_cache_rerun or args.compile_only) and args.backend == "inductor":
        rerun = result["cached_rerun"] = cached_rerun(args, cache, out_dir / "cached_rerun")
        for name, row in rerun.get("stages", {}).items():
            stages[name]["cached_compile_s"] = row["compile_s"]
            stages[name]["cached_first_call_s"] = row["compiled_first_call_s"]
            stages[name]["cached_start_over_eager_s"] = round(row["compiled_first_call_s"]
                                                              - row["eager_first_call_s"], 3)
            stages[name]["checks"] = checks(stages[name])
        out_file.write_text(json.dumps(result, indent=2) + "\n")
    if not args.compile_only:
        if args.profile:
            print(profile_lines(stages))
        print(table(stages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
