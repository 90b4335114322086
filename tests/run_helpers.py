"""Helpers shared by the end-to-end training tests (writing a config, running train.py, reading logs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch

import train

# The 72 published Fantasia3D configs (keys and values unchanged), by file stem.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = json.loads(
    (Path(__file__).parent / "data" / "published_configs.json").read_text())["configs"]


def write_config(folder: Path, values: dict[str, Any], name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(values))
    return path


def run_train(config: Path, *overrides: str) -> int:
    return train.main(["--config", str(config), *overrides])


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def assert_same_tensors(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where}: max diff {(a.float() - b.float()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def check_resume_matches_straight_run(folder: Path, config: dict[str, Any], stops: Sequence[int]
                                      ) -> tuple[dict[int, dict], dict, list[dict], list[dict]]:
    """The resume check of both phases: `config` run straight to its `iter` (folder/straight), and
    run to each of `stops` in turn, each run after the first continuing with resume=auto, then on to
    `iter` (folder/split). Asserts every run succeeds, the split run checkpointed at each stop, and
    both end at `iter` with identical phase and optimizer state and the split log numbered
    1..iter. Returns (the split run's checkpoint at each stop, its final checkpoint, the straight
    log, the split log) for the phase-specific checks."""
    total = config["iter"]
    straight, split = folder / "straight", folder / "split"
    assert run_train(write_config(folder, {**config, "out_dir": str(straight)}, "a.json")) == 0
    cfg = write_config(folder, {**config, "out_dir": str(split)}, "b.json")
    saved = {}
    for i, stop in enumerate(stops):
        assert run_train(cfg, f"iter={stop}", *(["resume=auto"] if i else [])) == 0
        saved[stop] = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
        assert saved[stop]["it"] == stop
    assert run_train(cfg, "resume=auto") == 0

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    assert a["it"] == b["it"] == total
    assert_same_tensors(a["phase"], b["phase"])
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    log_straight, log_split = read_log(straight), read_log(split)
    assert [r["it"] for r in log_split] == list(range(1, total + 1))
    return saved, b, log_straight, log_split
