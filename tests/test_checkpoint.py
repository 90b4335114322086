"""checkpoint.py: the atomic write, and a save that a resume restores, random streams included."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import distributed
from checkpoint import PREVIOUS_CHECKPOINT_NAME, Checkpoints, save_atomic
from config import Config
from run_status import RunContext, RunProgress, RunStatus, TrainingError

CPU = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make(run_dir: Path, **values: object) -> tuple[Checkpoints, RunContext]:
    streams = (torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
    context = RunContext(RunProgress(total=10), RunStatus(run_dir / "status.json"))
    cfg = Config(**{"mode": "geometry_modeling", "guidance": "target_mesh", **values})
    return Checkpoints(run_dir, CPU, cfg, streams, context), context


def test_failed_write_leaves_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_atomic({"it": 1}, path)

    def disk_full() -> None:
        raise OSError("no space left on device")
    with pytest.raises(OSError):
        save_atomic({"it": 2}, path, before_replace=disk_full)
    assert torch.load(path)["it"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_resume_restores_the_state_and_the_random_streams(tmp_path: Path) -> None:
    saver, context = make(tmp_path)
    saver.write(4, lambda: {"config": {"mode": "geometry_modeling"}, "weights": torch.ones(2)}, saver.gather_rng())
    assert (context.progress.checkpoint_it, context.progress.checkpoint_path) == (4, saver.path)
    expected = [torch.rand(3, generator=g) for g in saver.streams]      # drawn after the save

    loader, context = make(tmp_path)
    loaded: dict = {}
    assert loader.start("auto", loaded.update) == 4
    assert torch.equal(loaded["weights"], torch.ones(2)) and context.progress.iteration == 4
    for g, want in zip(loader.streams, expected):
        assert torch.equal(torch.rand(3, generator=g), want)


def test_resume_keeps_what_shapes_the_networks_and_warns_on_another_world_size(tmp_path: Path) -> None:
    saver, _ = make(tmp_path)
    # A checkpoint written before hash_table_log2 existed: its table had the default 2^19 rows.
    saver.write(2, lambda: {"config": {"mode": "geometry_modeling", "geometry": "dmtet"}},
                saver.gather_rng() * 2)   # as from 2 processes
    with pytest.raises(TrainingError, match=r"mode='geometry_modeling' \(this config: 'appearance_modeling'\)"):
        make(tmp_path, mode="appearance_modeling")[0].resume("auto", lambda state: None)
    with pytest.raises(TrainingError, match=r"hash_table_log2=19 \(this config: 16\).*resume=null"):
        make(tmp_path, hash_table_log2=16)[0].resume("auto", lambda state: None)
    with pytest.warns(UserWarning, match="written by 2 processes, running 1"):
        assert make(tmp_path)[0].resume("auto", lambda state: None) == 2


def test_fresh_start_sets_an_earlier_checkpoint_aside(tmp_path: Path) -> None:
    saver, _ = make(tmp_path)
    saver.write(2, lambda: {"config": {"mode": "geometry_modeling"}}, saver.gather_rng())
    assert saver.start(None, lambda state: None) == 0
    assert not saver.path.exists() and (saver.path.parent / PREVIOUS_CHECKPOINT_NAME).is_file()
