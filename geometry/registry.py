"""The geometry registry: a surface representation's name -> its class (geometry/base.py).

Torch-free, so that config validation can know the names without loading torch. A representation
module registers its class when imported:

    @register("my_surface")
    class MySurface(SurfaceGeometry): ...

and the geometry phase imports the built-in ones (phases/geometry.py), as it does the guidances.
A second representation is one new module plus its name in BUILTIN and its import there.
"""
from __future__ import annotations

from name_registry import NameRegistry

# Registered by geometry/dmtet.py; named here so that a name can be checked before that module
# (torch, scipy) is imported.
BUILTIN = ("dmtet",)
DEFAULT = "dmtet"


class UnknownGeometryError(ValueError):
    """A surface representation nobody registered was asked for."""


_GEOMETRIES = NameRegistry("geometry", BUILTIN, UnknownGeometryError, "the geometry phase (phases/geometry.py)")
register = _GEOMETRIES.register
unregister = _GEOMETRIES.unregister
names = _GEOMETRIES.names
geometry_class = _GEOMETRIES.get
