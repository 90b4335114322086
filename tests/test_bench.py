"""scripts/bench.py: attributing the host's waits for the device in a profiler trace."""
from __future__ import annotations

from scripts.bench import blocking_waits


def _span(cat: str, name: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur}


def test_blocking_waits_names_the_innermost_own_frame() -> None:
    own = {"trainer.py", "geometry/dmtet.py"}
    events = [
        _span("python_function", "trainer.py(250): train_step", 0, 10_000),
        _span("python_function", "geometry/dmtet.py(290): _marching_tets_topo", 100, 3_000),
        _span("python_function", "torch/_tensor.py(1): tolist", 200, 2_000),        # not ours
        _span("cuda_runtime", "cudaMemcpyAsync", 300, 1_500),                       # waited 1.5 ms
        _span("cuda_runtime", "cudaStreamSynchronize", 5_000, 600),                  # in train_step only
        _span("cuda_runtime", "cudaStreamSynchronize", 6_000, 50),                   # too short to count
        _span("cuda_runtime", "cudaLaunchKernel", 7_000, 900),                       # not a wait
        _span("cuda_runtime", "cudaEventSynchronize", 20_000, 400),                  # outside own frames
        {"ph": "i", "cat": "cuda_runtime", "name": "cudaMemcpyAsync", "ts": 0},      # not a span
    ]
    waits = blocking_waits(events, steps=2, own_files=own)
    assert waits == {"geometry/dmtet.py(290): _marching_tets_topo": 0.75,
                     "trainer.py(250): train_step": 0.3,
                     "cudaEventSynchronize": 0.2}
    assert list(waits) == sorted(waits, key=waits.get, reverse=True)             # longest first
