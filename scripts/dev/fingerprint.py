"""Bit-exact fingerprints of CPU training runs, to show a refactor changes nothing.

Runs the tiny configs (the Stable Diffusion and the target-mesh guidance, geometry then
appearance) with the code in --repo and prints, per run, a SHA-256 of every parameter tensor in
the final checkpoint, of the log's losses and of the exported mesh. Run it with the code before
and after a change and compare the two JSON files:

    python scripts/dev/fingerprint.py --repo OLD_CHECKOUT --out /tmp/before.json
    python scripts/dev/fingerprint.py --repo . --out /tmp/after.json
    python scripts/dev/fingerprint.py --compare /tmp/before.json /tmp/after.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from geometry.dmtet import GRID_BUFFERS  # noqa: E402

SHORT = ["iter=20", "coarse_iter=10", "save_interval=20", "sdf_init_iter=200", "video_frames=0", "tensorboard=off",
         "validate=false"]
# (name, config, extra overrides); {geometry} is the first run's exported mesh, {textured} the second's.
RUNS = [
    ("geometry_sd", "configs/tiny_cpu_geometry.json", []),
    ("appearance_sd", "configs/tiny_cpu_appearance.json", ["base_mesh={geometry}"]),
    ("geometry_target", "configs/tiny_cpu_geometry.json", ["guidance=target_mesh", "target_mesh=data/meshes/bunny_like.obj"]),
    ("appearance_target", "configs/tiny_cpu_appearance.json",
     ["base_mesh={geometry}", "guidance=target_mesh", "target_mesh={textured}"]),
]


def tensor_digest(obj: object, h: "hashlib._Hash") -> None:
    if isinstance(obj, torch.Tensor):
        h.update(obj.detach().cpu().contiguous().numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(str(k).encode())
            tensor_digest(obj[k], h)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            tensor_digest(v, h)
    else:
        h.update(repr(obj).encode())


def fingerprint(run_dir: Path) -> dict[str, str]:
    state = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    geometry = state["phase"].get("geometry")
    if isinstance(geometry, dict):   # older checkpoints also hold the tet grid, which follows from grid_res
        state["phase"]["geometry"] = {k: v for k, v in geometry.items() if k not in GRID_BUFFERS}
    parts = {}
    for name, value in (("phase", state["phase"]), ("optimizer", state["optimizer"]["state"])):
        h = hashlib.sha256()
        tensor_digest(value, h)
        parts[name] = h.hexdigest()[:16]
    losses = [json.loads(line)["loss"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    parts["losses"] = hashlib.sha256(json.dumps(losses).encode()).hexdigest()[:16]
    parts["mesh.obj"] = hashlib.sha256((run_dir / "dmtet_mesh" / "mesh.obj").read_bytes()).hexdigest()[:16]
    return parts


def run_all(repo: Path, work: Path) -> dict[str, dict[str, str]]:
    results, outputs = {}, {}
    for name, config, extra in RUNS:
        out = work / name
        args = [a.format(**outputs) for a in extra]
        cmd = [sys.executable, "train.py", "--config", config, *SHORT, f"out_dir={out}", *args]
        print(" ".join(cmd), file=sys.stderr, flush=True)
        subprocess.run(cmd, cwd=repo, check=True, stdout=subprocess.DEVNULL)
        results[name] = fingerprint(out)
        mesh = str(out / "dmtet_mesh" / "mesh.obj")
        outputs.setdefault("geometry" if name.startswith("geometry") else "textured", mesh)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path("."))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        same = before == after
        print("identical" if same else json.dumps({"before": before, "after": after}, indent=1))
        return 0 if same else 1
    with tempfile.TemporaryDirectory() as tmp:
        results = run_all(args.repo.resolve(), Path(tmp))
    text = json.dumps(results, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
