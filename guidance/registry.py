"""The guidance registry: the config's `guidance` value -> the factory that builds it.

Torch-free, so that config validation (and `train.py --check`) knows the names without loading a
model. A guidance module registers itself when imported:

    @register("my_guidance")
    def build(env: GuidanceEnv) -> Guidance: ...

(see guidance/base.py for GuidanceEnv and the Guidance interface, docs/DESIGN.md, "Extension points").
"""
from __future__ import annotations

from typing import Any

from name_registry import NameRegistry

# Registered by guidance/stable_diffusion.py and guidance/target_mesh.py; named here so that a
# config is checked against them before those modules (torch, diffusers) are imported.
BUILTIN = ("stable_diffusion", "target_mesh")


class UnknownGuidanceError(ValueError):
    """The config names a guidance nobody registered."""


_GUIDANCES = NameRegistry("guidance", BUILTIN, UnknownGuidanceError, "the phases package (phases/base.py)")
register = _GUIDANCES.register
unregister = _GUIDANCES.unregister
names = _GUIDANCES.names
factory = _GUIDANCES.get


def build(env: Any) -> Any:
    """The guidance `env.cfg.guidance` names, built for `env` (a guidance.base.GuidanceEnv)."""
    return factory(env.cfg.guidance)(env)
