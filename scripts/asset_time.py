"""Whole-asset wall time: a geometry config, then the appearance config that textures its mesh, each
at its full schedule, timed per phase and split into where the time went.

    python scripts/asset_time.py --geometry configs/car_geometry.json \
        --appearance configs/car_appearance_strategy0.json --out asset.json [-- key=value ...]

Each phase is one `python train.py --config X` (with `--nproc N`: `torchrun --nproc_per_node=N
train.py`), as a user runs it; the appearance run's `base_mesh` is the geometry run's exported mesh.
`key=value` overrides after `--` go to both runs (e.g. `emulate_gpus=8`, `video_frames=0`); the
script's own `out_dir` (and the appearance `base_mesh`) come last and win. `--sd-model` sets
`sd_model` for both. The run folders go to a temporary folder, removed at the end unless `--keep`
(or a run fails: then they stay, for its status.json).

The split comes from each run's status.json, key `timings_s` (run_status.py, "Where the time
goes": rank 0 charges the wall time between changes of its activity to load, sdf_pretraining,
coarse, fine, appearance, validation, checkpoints, export, video). Around them this script adds
the time from launching the process to the run's first timing (`start`: interpreter, imports,
process group; `timing_start_unix_s`) and from the last status write to the process's exit
(`exit`), so the rows of a phase add up to its measured wall time. On CUDA the host runs ahead of
the device by at most one step and nothing here synchronizes it: the boundaries between rows are
accurate to about one training step.

Honest full-size timing without real weights. A full-size random model whose UNet predicts zero
(`python scripts/make_tiny_sd.py DIR --full-size --zero-output`) costs exactly what the real
weights cost per step, but its guidance erases the surface within a few hundred geometry steps,
which ends the run ("the shape vanished") long before its schedule does. `--keep-surface
TARGET_MESH` prevents that. The geometry run then uses the guidance `keep_surface`,
registered by this script in the training process: every step it does the Stable Diffusion
guidance's whole work (the draw, the VAE encoder's forward and backward, the UNet) and the
target-mesh guidance's, and returns the target-mesh SDS result plus 0 x the Stable Diffusion loss.
Autograd therefore still runs the VAE encoder backward (the same kernels, on zeros) while the
surface follows TARGET_MESH: an object's surface, as in a real run, not a vanishing one. What it
adds to a real run's work is one render of TARGET_MESH without gradients per micro-step (not
subtracted from the figures). The appearance run needs none of this (its mesh is fixed, and the
target-mesh guidance would need a textured target), so it runs plain train.py.

Why a process per phase, the geometry one started as `python scripts/asset_time.py --_train ...`
(under torchrun, every rank): the guidance has to be registered in each training process before
its config loads, and a fresh process per phase is what a user's two train.py commands are; it
also times the start-up honestly and frees the geometry run's GPU memory before the appearance run.
"""
from __future__ import annotations

import os

# Before torch loads (as in train.py): spinning OpenMP waits slow small CPU ops badly once another
# process shares the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import distributed  # noqa: E402
import train  # noqa: E402
from dataset.cameras import CameraBatch  # noqa: E402
from guidance import registry  # noqa: E402
from guidance.base import GuidanceEnv, StageInput  # noqa: E402
from guidance.stable_diffusion import StableDiffusion  # noqa: E402
from guidance.target_mesh import TargetMeshGuidance  # noqa: E402
from guidance.target_mesh import build as build_target_mesh  # noqa: E402
from sd import SDSResult, SdsDraw  # noqa: E402

KEEP_SURFACE = "keep_surface"     # the guidance name the geometry run uses under --keep-surface
TRAIN_IN_PROCESS = "--_train"     # argv[1] of a training process this script starts
SCRIPT = Path(__file__).resolve()

# The rows of the report, in order: status.json's categories, between the process's start and exit.
ROWS: dict[str, str] = {
    "start": "process start (interpreter, imports, process group)",
    "load": "model load and preparation (+ compiles done while loading)",
    "sdf_pretraining": "SDF pretraining",
    "coarse": "coarse stage",
    "fine": "fine stage",
    "appearance": "appearance stage",
    "validation": "validation",
    "checkpoints": "checkpoint writes",
    "export": "export",
    "video": "turntable video",
    "other": "other",
    "exit": "process exit (after the last status write)",
}


class AssetTimeError(RuntimeError):
    """A phase could not be timed: the message names the phase and where its run folder is."""


# ------------------------------------------------------------------------------------------------
# The keep-surface guidance (runs in the training processes)
# ------------------------------------------------------------------------------------------------
@dataclass
class PairedDraw:
    """One step's draws of both guidances (the phase hands it back to `sds` unopened)."""
    diffusion: SdsDraw
    target: SdsDraw


class KeepSurface:
    """Stable Diffusion's full work every step, the target mesh's gradient (module doc)."""

    def __init__(self, env: GuidanceEnv) -> None:
        self.diffusion = StableDiffusion(env)
        self.target: TargetMeshGuidance = build_target_mesh(env)

    def stage_input(self, stage: str) -> StageInput:
        return self.diffusion.stage_input(stage)    # the target guidance asks for the same input

    def draw(self, stage: str, it: int, cams: CameraBatch, generator: torch.Generator) -> PairedDraw:
        diffusion = self.diffusion.draw(stage, it, cams, generator)
        return PairedDraw(diffusion, self.target.draw(stage, it, cams, generator))

    def sds(self, x: torch.Tensor, stage: str, it: int, cams: CameraBatch, generator: torch.Generator,
            draw: PairedDraw | None = None) -> SDSResult:
        draw = draw or self.draw(stage, it, cams, generator)
        work = self.diffusion.sds(x, stage, it, cams, generator, draw.diffusion)
        kept = self.target.sds(x, stage, it, cams, generator, draw.target)
        # 0 x the diffusion loss: its backward (VAE encoder included) runs, on zeros; the logged
        # loss and non-finite count are the target's, whose gradient moves the surface.
        return SDSResult(loss=kept.loss + 0.0 * work.loss, t=kept.t, stats=kept.stats)


def build_keep_surface(env: GuidanceEnv) -> KeepSurface:
    return KeepSurface(env)


def train_keeping_surface(argv: list[str]) -> int:
    """A training process of the geometry phase: train.py's main with the guidance registered."""
    registry.register(KEEP_SURFACE)(build_keep_surface)
    return train.main(argv)


# ------------------------------------------------------------------------------------------------
# Running a phase
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """What the two runs share: processes, overrides, the keep-surface target, where folders go."""
    nproc: int
    overrides: list[str]
    keep_surface: Path | None
    runs: Path


@dataclass
class PhaseTime:
    name: str                          # "geometry" | "appearance"
    config: str
    command: list[str]
    run_dir: Path
    wall_s: float
    seconds: dict[str, float]          # ROWS key -> seconds; they add up to wall_s
    status: dict[str, Any]             # the run's final status.json


def phase_command(config: str, overrides: list[str], nproc: int, keep_surface: bool) -> list[str]:
    """The command that trains `config`: python or torchrun, train.py or this script's training entry."""
    program = [str(SCRIPT), TRAIN_IN_PROCESS] if keep_surface else [str(REPO / "train.py")]
    argv = [*program, "--config", config, *overrides]
    return distributed.torchrun_command(nproc, argv) if nproc > 1 else [sys.executable, *argv]


def phase_overrides(name: str, plan: Plan, run_dir: Path, base_mesh: Path | None) -> list[str]:
    """The user's overrides, then this script's (they win): the run folder, the mesh to texture,
    and for the geometry run under --keep-surface the guidance and its target."""
    own = [f"out_dir={run_dir}"]
    if base_mesh is not None:
        own.append(f"base_mesh={base_mesh}")
    if name == "geometry" and plan.keep_surface is not None:
        own += [f"guidance={KEEP_SURFACE}", f"target_mesh={plan.keep_surface}"]
    return [*plan.overrides, *own]


def wait_for(proc: subprocess.Popen) -> int:
    """The run's exit code. A Ctrl-C reaches the run too, which ends itself (checkpoint, export,
    status.json): wait for that instead of killing it mid-write."""
    while True:
        try:
            return proc.wait()
        except KeyboardInterrupt:
            continue


def read_status(name: str, run_dir: Path) -> dict[str, Any]:
    path = run_dir / "status.json"
    if not path.is_file():
        raise AssetTimeError(f"the {name} run wrote no {path}: it stopped before its run folder existed "
                             "(a config error: see its message above)")
    return json.loads(path.read_text())


def split(status: dict[str, Any], launched_unix_s: float, wall_s: float) -> dict[str, float]:
    """The rows of one phase: status.json's categories (unknown ones under "other"), the process
    start before them and the process exit after them."""
    seconds = dict.fromkeys(ROWS, 0.0)
    for category, value in status.get("timings_s", {}).items():
        seconds[category if category in ROWS else "other"] += float(value)
    seconds["start"] = float(status["timing_start_unix_s"]) - launched_unix_s
    seconds["exit"] = wall_s - sum(v for k, v in seconds.items() if k != "exit")
    return {k: round(v, 3) for k, v in seconds.items()}


def run_phase(name: str, config: str, plan: Plan, base_mesh: Path | None = None) -> PhaseTime:
    run_dir = plan.runs / name
    keep = name == "geometry" and plan.keep_surface is not None
    command = phase_command(config, phase_overrides(name, plan, run_dir, base_mesh), plan.nproc, keep)
    print(f"\n== {name}: {' '.join(command)}", flush=True)
    launched = time.time()
    t0 = time.perf_counter()
    code = wait_for(subprocess.Popen(command))
    wall = time.perf_counter() - t0
    status = read_status(name, run_dir)
    if code != 0:
        raise AssetTimeError(f"the {name} run ended with exit code {code} ({status.get('state')}, its message "
                             f"is above and in {run_dir / 'status.json'})")
    return PhaseTime(name, config, command, run_dir, round(wall, 3), split(status, launched, wall), status)


# ------------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------------
def asset_seconds(phases: list[PhaseTime]) -> dict[str, float]:
    return {row: round(sum(p.seconds[row] for p in phases), 3) for row in ROWS}


def device_name() -> str:
    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def report(args: argparse.Namespace, plan: Plan, phases: list[PhaseTime]) -> dict[str, Any]:
    wall = round(sum(p.wall_s for p in phases), 3)
    return {
        "geometry_config": args.geometry, "appearance_config": args.appearance, "nproc": plan.nproc,
        "overrides": plan.overrides, "keep_surface": None if plan.keep_surface is None else str(plan.keep_surface),
        "device": device_name(), "torch": torch.__version__, "host": socket.gethostname(),
        "rows": ROWS, "run_folders": str(plan.runs) if args.keep else None,
        "phases": {p.name: {"config": p.config, "command": p.command, "wall_s": p.wall_s, "seconds": p.seconds,
                            "iterations": p.status.get("iterations"), "state": p.status.get("state")}
                   for p in phases},
        "asset": {"wall_s": wall, "wall_min": round(wall / 60, 2), "seconds": asset_seconds(phases)},
    }


def table(result: dict[str, Any]) -> str:
    phases = result["phases"]
    names = list(phases)
    width = max(len(label) for label in ROWS.values())
    head = f"{'':<{width}}" + "".join(f"{n:>13}" for n in [*names, "asset"])
    lines = [head]
    for row, label in ROWS.items():
        values = [phases[n]["seconds"][row] for n in names] + [result["asset"]["seconds"][row]]
        lines.append(f"{label:<{width}}" + "".join(f"{v:>11.1f} s" for v in values))
    walls = [phases[n]["wall_s"] for n in names] + [result["asset"]["wall_s"]]
    lines.append(f"{'total (wall)':<{width}}" + "".join(f"{v:>11.1f} s" for v in walls))
    lines.append(f"asset: {result['asset']['wall_min']:.2f} min on {result['device']}, {result['nproc']} process(es)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Overrides after --: key=value, given to both runs.")
    ap.add_argument("--geometry", required=True, help="the geometry config")
    ap.add_argument("--appearance", required=True, help="the appearance config (its base_mesh is replaced by "
                                                         "the geometry run's mesh)")
    ap.add_argument("--sd-model", default=None, help="sd_model for both runs (e.g. a full-size random model)")
    ap.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when more than 1)")
    ap.add_argument("--keep", action="store_true", help="keep the run folders (printed at the end)")
    ap.add_argument("--keep-surface", default=None, metavar="TARGET_MESH",
                    help="the geometry surface follows this mesh while the Stable Diffusion work still runs "
                         "(timing without real weights: see above)")
    ap.add_argument("--out", default=None, help="write the report as JSON here")
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    for what, path in (("--geometry", args.geometry), ("--appearance", args.appearance),
                       ("--keep-surface", args.keep_surface)):
        if path is not None and not Path(path).is_file():
            raise AssetTimeError(f"{what}: file not found: {path}")
    if args.nproc < 1:
        raise AssetTimeError(f"--nproc: expected 1 or more processes, got {args.nproc}")
    overrides = [*args.overrides, *([f"sd_model={args.sd_model}"] if args.sd_model else [])]
    keep = None if args.keep_surface is None else Path(args.keep_surface).resolve()
    return Plan(args.nproc, overrides, keep, Path(tempfile.mkdtemp(prefix="asset_time_")))


def time_asset(args: argparse.Namespace, plan: Plan) -> dict[str, Any]:
    geometry = run_phase("geometry", args.geometry, plan)
    mesh = geometry.run_dir / "dmtet_mesh" / "mesh.obj"
    appearance = run_phase("appearance", args.appearance, plan, base_mesh=mesh)
    return report(args, plan, [geometry, appearance])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [TRAIN_IN_PROCESS]:
        return train_keeping_surface(argv[1:])
    args = parse_args(argv)
    try:
        plan = make_plan(args)
    except AssetTimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        result = time_asset(args, plan)
    except AssetTimeError as e:
        print(f"error: {e}; the run folders are kept: {plan.runs}", file=sys.stderr)
        return 1
    if not args.keep:
        shutil.rmtree(plan.runs, ignore_errors=True)
    print("\n" + table(result) + (f"\nrun folders: {plan.runs}" if args.keep else ""), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
