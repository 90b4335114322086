"""A test hook that ends a run at a chosen point, so tests of interrupts and failures are exact.

`F3D_TEST_FAULT="POINT:N:ACTION[:RANK]"` (several separated by commas) makes the process, when
it reaches POINT for the N-th time (1-based) on rank RANK (default: every rank), do ACTION:
send itself SIGINT, SIGTERM or SIGKILL (the real signal path: handlers, exit codes), or `error`
(raise TrainingError, as a failing step would). Points:

- `pretrain`: before SDF pretraining step N;
- `train`: before training iteration N (counted from 1 across resumes: N is the iteration);
- `checkpoint`: checkpoint of iteration N, after its temporary file is written and before it
  replaces last.pt (a kill there is a kill during the checkpoint write);
- `export`: before the export (N = 1).

Unset (always, outside tests) it costs one dictionary lookup per call.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from functools import lru_cache

from run_status import TrainingError

ENV = "F3D_TEST_FAULT"
ACTIONS = ("SIGINT", "SIGTERM", "SIGKILL", "error")


@dataclass(frozen=True)
class Fault:
    point: str
    n: int
    action: str
    rank: int | None = None


def parse(spec: str) -> list[Fault]:
    faults = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        if len(fields) not in (3, 4) or fields[2] not in ACTIONS:
            raise ValueError(f"{ENV}: expected POINT:N:ACTION[:RANK] with ACTION one of {ACTIONS}; got {part!r}")
        faults.append(Fault(fields[0], int(fields[1]), fields[2], int(fields[3]) if len(fields) == 4 else None))
    return faults


@lru_cache(maxsize=1)
def _active() -> dict[tuple[str, int], list[Fault]]:
    table: dict[tuple[str, int], list[Fault]] = {}
    for fault in parse(os.environ.get(ENV, "")):
        table.setdefault((fault.point, fault.n), []).append(fault)
    return table


def point(name: str, n: int) -> None:
    """Reached `name` for the n-th time: do what F3D_TEST_FAULT asks for here, if anything."""
    table = _active()
    if not table:
        return
    rank = int(os.environ.get("RANK", "0") or 0)
    for fault in table.get((name, n), []):
        if fault.rank is None or fault.rank == rank:
            _do(fault, rank)


def _do(fault: Fault, rank: int) -> None:
    if fault.action == "error":
        raise TrainingError(f"test fault at {fault.point} {fault.n} on rank {rank} ({ENV})")
    # raise_signal runs the Python handler before it returns: the run reacts at this exact point.
    signal.raise_signal(getattr(signal, fault.action))
