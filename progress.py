"""Progress for the run's long phases: tqdm bars with an ETA, and timed lines for single calls.

One place decides how progress looks, so model loading, SDF pretraining, training, UV
unwrapping, baking and the video all report alike: on stderr (stdout keeps the results), from
rank 0 only (`configure(enabled=info.is_main)`; N processes would print N bars).
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterator

from tqdm import tqdm


@dataclass
class ProgressOptions:
    enabled: bool = True        # False on every rank but 0
    min_interval_s: float = 0.5  # redraw at most this often (a log file gets a line per redraw)
    # Bars of phases shorter than this never appear: the tiny demo bakes in a fraction of a
    # second, and a bar that is born finished is noise.
    delay_s: float = 2.0


OPTIONS = ProgressOptions()


def configure(enabled: bool) -> None:
    OPTIONS.enabled = enabled


def bar(total: int | None, desc: str, unit: str = "it", initial: int = 0, show_at_once: bool = False) -> Any:
    """A tqdm bar on stderr (a disabled one that accepts the same calls where progress is off).

    `show_at_once`: draw it from the start (training, pretraining: the user waits for the first
    number) instead of after OPTIONS.delay_s."""
    return tqdm(total=total, desc=desc, unit=unit, initial=initial, file=sys.stderr, dynamic_ncols=True,
                mininterval=OPTIONS.min_interval_s, delay=0 if show_at_once else OPTIONS.delay_s,
                disable=not OPTIONS.enabled)


@contextlib.contextmanager
def timed(what: str) -> Iterator[None]:
    """A line before and after one long call that cannot report steps (loading a model, xatlas):
    `what...` then `what: 12.3 s`."""
    start = time.perf_counter()
    if OPTIONS.enabled:
        print(f"{what}...", file=sys.stderr, flush=True)
    yield
    if OPTIONS.enabled:
        print(f"{what}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


def note(text: str, every_rank: bool = False) -> None:
    """One line on stderr, drawn above a progress bar that is on screen (e.g. what the first
    training step compiles). `every_rank`: also where progress is off, for what each process must
    say itself (a fallback that may differ between processes)."""
    if OPTIONS.enabled or every_rank:
        tqdm.write(text, file=sys.stderr)
