"""Multi-process training on CPU: torchrun with 2 gloo processes.

The run must finish, every rank must hold identical parameters (the log's per-rank parameter
checksums at save points), and the ranks must have drawn cameras from different azimuth sectors
(the log's per-rank azimuths every iteration).
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import distributed
from dataset.cameras import azimuth_sector
from scripts.weak_scaling import azimuth_arc

ROOT = Path(__file__).resolve().parents[1]




def in_sector(azimuth_deg: float, sector: tuple[float, float]) -> bool:
    lo, hi = sector
    return lo <= lo + (azimuth_deg - lo) % 360.0 < hi


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.slow
def test_torchrun_two_cpu_processes(tmp_path: Path, tiny_sd_path: Path) -> None:

    run_dir = tmp_path / "run"
    # Two save points (two parameter checksums) and both stages; each iteration costs both ranks a step.
    iters, save = 4, 2
    cfg = tmp_path / "ddp.json"
    cfg.write_text(json.dumps({
        "mode": "geometry_modeling", "text": "a cup", "device": "cpu", "sd_model": str(tiny_sd_path),
        "dmtet_grid": 32, "train_res": [64, 64], "batch": 2, "iter": iters, "coarse_iter": 2,
        "save_interval": save, "sdf_init_iter": 60, "seed": 7, "hash_table_log2": 16,
        "validate": False, "out_dir": str(run_dir)}))
    # One OpenMP thread per process: 2 processes share the 2 cores without oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = distributed.torchrun_command(2, ["train.py", "--config", str(cfg)])
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]

    log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["it"] for r in log] == list(range(1, iters + 1))   # rank 0 alone writes the log

    # Identical parameters on both ranks at every save point (exact float64 sums).
    checked = [r for r in log if "param_checksum" in r]
    assert [r["it"] for r in checked] == [save, 2 * save]
    for r in checked:
        rank0, rank1 = r["param_checksum"]
        assert rank0 == rank1, r["param_checksum"]
    # ... and they did move away from the initialization together.
    assert checked[0]["param_checksum"][0] != checked[1]["param_checksum"][0]

    # Each rank drew its azimuths from its own half of the circle, every iteration.
    sectors = [azimuth_sector(r, 2) for r in range(2)]
    assert sectors[0] != sectors[1]
    for r in log:
        per_rank = r["azimuth_deg"]
        assert len(per_rank) == 2 and all(len(a) == 2 for a in per_rank)
        for rank, azimuths in enumerate(per_rank):
            assert all(in_sector(a, sectors[rank]) for a in azimuths), (r["it"], rank, azimuths)

    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    # Per-rank RNG streams differ (seed + rank).
    assert not torch.equal(ckpt["rng"][0]["cam"], ckpt["rng"][1]["cam"])
    assert (run_dir / "dmtet_mesh" / "mesh.obj").is_file()


def _step_all_reduce_worker(rank: int, port: int, out_dir: str) -> None:

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        info = distributed.DistInfo(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"))
        with_grad = torch.nn.Parameter(torch.zeros(3))
        with_grad.grad = torch.full((3,), float(rank + 1))          # rank 0: 1s, rank 1: 2s
        without_grad = torch.nn.Parameter(torch.zeros(2))           # no .grad on either rank
        tail = distributed.step_all_reduce(
            [with_grad, without_grad], [rank == 1, False], [10.0 * rank, 10.0 * rank + 1], info)
        flags, values = distributed.split_tail(tail.tolist(), 2, 2)
        torch.save({"flags": flags, "values": values, "grad": with_grad.grad.clone(),
                    "zero_grad": without_grad.grad.clone()}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_step_all_reduce_averages_grads_ors_flags_and_gathers_values(tmp_path: Path) -> None:

    mp.spawn(_step_all_reduce_worker, args=(distributed.free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["flags"] == [True, False]                 # OR over ranks, the same on both
        assert got["values"] == [[0.0, 1.0], [10.0, 11.0]]   # every rank's values, in rank order
        torch.testing.assert_close(got["grad"], torch.full((3,), 1.5))   # mean of 1 and 2
        torch.testing.assert_close(got["zero_grad"], torch.zeros(2))


def test_step_all_reduce_one_process_is_a_pass_through() -> None:
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 2.0])
    tail = distributed.step_all_reduce([p], [True, False], [3.5], info)
    assert distributed.split_tail(tail.tolist(), 2, 1) == ([True, False], [[3.5]])
    assert p.grad.tolist() == [1.0, 2.0]


def test_weak_scaling_reports_a_sector_across_the_seam_as_one_arc() -> None:
    assert azimuth_arc([-44.0, 0.0, 134.0]) == [-44.0, 134.0]
    assert azimuth_arc([140.0, 179.0, -179.0, -50.0]) == [140.0, 310.0]   # the back half: [135, 315)
    assert azimuth_arc([10.0]) == [10.0, 10.0]
