"""run_log.py: one line per logged iteration, the parameter checksum at save points only, and a
resumed run's log cut back to where it starts."""
from __future__ import annotations

import json
from pathlib import Path

import torch

import distributed
from config import build_config
from run_log import RunLog

CPU = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_records_are_written_at_once_on_cpu_with_checksums_at_save_points(tmp_path: Path) -> None:
    cfg = build_config({"mode": "geometry_modeling", "text": "a toy", "iter": 5, "coarse_iter": 2, "save_interval": 2,
                        "tensorboard": "off"})
    params = [torch.nn.Parameter(torch.tensor([1.0, 2.0]))]
    log = RunLog(cfg, CPU, tmp_path, params)
    with log.flushed_at_end():
        for it in range(1, 6):
            assert log.start_timer() is None                 # CPU: host time only
            log.log({"it": it, "loss": 0.5})
    records = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [r["it"] for r in records] == [1, 2, 3, 4, 5]
    assert [it for it, r in enumerate(records, 1) if "param_checksum" in r] == [2, 4, 5]
    assert records[1]["param_checksum"] == [[3.0, 5.0]]        # one rank: (sum, sum of squares)
    log.cut_back(3)
    assert [json.loads(line)["it"] for line in log.path.read_text().splitlines()] == [1, 2, 3]
