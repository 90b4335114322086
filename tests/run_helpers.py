"""Helpers shared by the end-to-end training tests (writing a config, running train.py, reading logs)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import train


def write_config(folder: Path, values: dict[str, Any], name: str = "config.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(values))
    return path


def run_train(config: Path, *overrides: str) -> int:
    return train.main(["--config", str(config), *overrides])


def read_log(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
