"""Shared pytest fixtures."""
from __future__ import annotations

import os

# Before torch loads: spinning OpenMP waits make small CPU ops ~20x slower whenever another
# process (a torchrun test, a subprocess run) shares the 2 cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_sd_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Stable Diffusion folder (scripts/make_tiny_sd.py), built once per session."""
    # Heavy: diffusers and transformers take seconds to import, so only sessions that use the
    # tiny model pay for them (at module level every pytest run, even of torch-free tests, would).
    from scripts.make_tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "model")
