"""The run's log: `log.jsonl`, one JSON line per iteration, mirrored to TensorBoard (docs/DESIGN.md,
"Training loop", Logging).

On CUDA a step's time is the device time between two CUDA events around it, read without a device
synchronize: each record is held back until the next one arrives, by when its step has long
finished on the device.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Iterator

import torch

import distributed
import tb_log
from config import Config, write_text_atomic

Record = dict[str, Any]


def rewrite_log(path: Path, upto: int) -> None:
    """Keep the log's records of iterations 1..`upto` (where the run starts: the checkpoint's
    iteration, 0 when fresh), one per iteration, written back atomically. The run appends from
    there, so the log never holds an iteration twice, whatever an earlier run logged after its
    last checkpoint. A line cut short by a kill is dropped."""
    if not path.exists():
        return
    kept: dict[int, str] = {}
    for line in path.read_text().splitlines():
        try:
            it = json.loads(line).get("it")
        except (json.JSONDecodeError, AttributeError):
            continue
        if isinstance(it, int) and 1 <= it <= upto:
            kept[it] = line                  # a later line of the same iteration replaces an earlier one
    write_text_atomic(path, "".join(kept[it] + "\n" for it in sorted(kept)))


def param_checksum(params: list[torch.Tensor]) -> list[float]:
    """(sum, sum of squares) of all parameters in float64: equal on every rank iff in sync."""
    with torch.no_grad():
        flat = [p.detach().double().reshape(-1) for p in params]
        return [float(sum(f.sum() for f in flat)), float(sum((f * f).sum() for f in flat))]


class RunLog:
    """log.jsonl and its TensorBoard mirror; every rank calls it alike (the checksum at save points
    is a collective), rank 0 alone writes."""

    def __init__(self, cfg: Config, info: distributed.DistInfo, run_dir: Path, params: list[torch.Tensor]) -> None:
        self.cfg, self.info, self.params = cfg, info, params
        self.path = run_dir / "log.jsonl"
        self.tb = tb_log.open_for_run(cfg.tensorboard, run_dir, info.is_main)   # TensorBoard mirror of the run
        # CUDA timing: events of steps not yet logged, and the one record held back until its
        # end event has passed (written by the next log() or flush()).
        self._step_events: dict[int, tuple[Any, Any]] = {}
        self._pending_record: Record | None = None

    def cut_back(self, upto: int) -> None:
        """Rank 0: drop what an earlier run logged after iteration `upto`, where this run starts."""
        if self.info.is_main:
            rewrite_log(self.path, upto)

    # -------------------------------------------------------------------------------- step timing
    def start_timer(self) -> Any | None:
        """CUDA events around the step instead of a device synchronize: the host runs ahead."""
        if self.info.device.type != "cuda":
            return None
        start = torch.cuda.Event(enable_timing=True)
        start.record()
        return start

    def end_timer(self, it: int, start: Any | None) -> None:
        """Close step `it`'s timing begun by start_timer (nothing on CPU)."""
        if start is None:
            return
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        self._step_events[it] = (start, end)
        for k in [k for k in self._step_events if k < it - 1]:   # never logged (e.g. a benchmark)
            del self._step_events[k]

    def step_start_event(self, it: int) -> Any | None:
        """The CUDA event recorded when step `it` began; None on CPU, and once the step's record is
        logged (or two steps on, if it never is). Benchmarks time consecutive step starts with it."""
        events = self._step_events.get(it)
        return None if events is None else events[0]

    # -------------------------------------------------------------------------------- records
    def log(self, record: Record) -> None:
        if record["it"] % self.cfg.save_interval == 0 or record["it"] == self.cfg.iter:
            # Collective, at save points only (cheap): every rank's parameter checksum, so the log
            # shows that all ranks hold identical parameters.
            record["param_checksum"] = distributed.gather_floats(param_checksum(self.params), self.info)
        if self.info.device.type == "cuda":
            record["peak_mem_mb"] = round(torch.cuda.max_memory_allocated(self.info.device) / 2**20, 1)
        if record["it"] not in self._step_events:  # CPU (or a record made elsewhere): write it now
            self._write_record(record)
            return
        # CUDA: hold this record back; the previous one's end event has passed by now (this step
        # waited for the device), so its device time is read without a synchronize.
        self.flush(wait=False)
        self._pending_record = record

    def flush(self, wait: bool = True) -> None:
        """Write the held-back record with its step's device time (waits for it when `wait`)."""
        record, self._pending_record = self._pending_record, None
        if record is None:
            return
        start, end = self._step_events.pop(record["it"], (None, None))
        if end is not None and (wait or end.query()):
            end.synchronize()
            record["ms"] = round(start.elapsed_time(end), 2)
        self._write_record(record)

    @contextlib.contextmanager
    def flushed_at_end(self) -> Iterator[None]:
        """Write the held-back record when the block ends, also when it ends with an error."""
        try:
            yield
        finally:
            self.flush()

    def _write_record(self, record: Record) -> None:
        if self.info.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.tb.log_scalars(record["it"], record)
