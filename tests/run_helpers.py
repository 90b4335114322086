"""Helpers shared by the end-to-end training tests (writing a config, running train.py, reading logs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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


def check_resume_matches_straight_run(folder: Path, config: dict[str, Any], stop_at: int
                                      ) -> tuple[dict, dict, list[dict], list[dict]]:
    """The resume check of both phases: `config` run straight to its `iter` (folder/straight), and
    run to `stop_at`, then continued with resume=auto (folder/split). Asserts both succeed, the split
    run checkpointed at `stop_at`, and both end at `iter` with identical phase and optimizer state
    and the split log numbered 1..iter. Returns (the split run's checkpoint at `stop_at`, its final
    checkpoint, the straight log, the split log) for the phase-specific checks."""
    total = config["iter"]
    straight, split = folder / "straight", folder / "split"
    assert run_train(write_config(folder, {**config, "out_dir": str(straight)}, "a.json")) == 0
    cfg = write_config(folder, {**config, "out_dir": str(split)}, "b.json")
    assert run_train(cfg, f"iter={stop_at}") == 0
    first = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    assert first["it"] == stop_at
    assert run_train(cfg, "resume=auto") == 0

    a = torch.load(straight / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(split / "checkpoints" / "last.pt", weights_only=False)
    assert a["it"] == b["it"] == total
    assert_same_tensors(a["phase"], b["phase"])
    assert_same_tensors(a["optimizer"]["state"], b["optimizer"]["state"])
    log_straight, log_split = read_log(straight), read_log(split)
    assert [r["it"] for r in log_split] == list(range(1, total + 1))
    return first, b, log_straight, log_split
