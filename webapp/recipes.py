"""What the app can run: each shipped config alone, and geometry -> appearance pairs in sequence."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from config import PROJECT_ROOT, ConfigError, read_json

CONFIGS_DIR = PROJECT_ROOT / "configs"
SEQUENCE_ARROW = " -> "


@dataclass(frozen=True)
class Recipe:
    """A dropdown entry: one shipped config, or a geometry config then the appearance config that
    textures its mesh."""
    label: str
    configs: tuple[Path, ...]
    modes: tuple[str, ...]

    @property
    def is_sequence(self) -> bool:
        return len(self.configs) > 1


def _mode(values: dict) -> str:
    return values.get("mode", "geometry_modeling")


def _run_name(path: Path, values: dict) -> str:
    """The run folder name a config writes under out/ (as Config.run_dir)."""
    return values.get("out_dir") or path.stem


def _geometry_for(appearance: dict, geometries: dict[str, Path]) -> Path | None:
    """The geometry config whose exported mesh this appearance config textures, if shipped."""
    base = Path(appearance.get("base_mesh") or "")
    if base.parts[:1] != ("out",) or base.parts[-2:] != ("dmtet_mesh", "mesh.obj") or len(base.parts) != 4:
        return None
    return geometries.get(base.parts[1])


def shipped_recipes(configs_dir: Path = CONFIGS_DIR) -> list[Recipe]:
    """Every config in configs/ (file order), then the geometry -> appearance sequences."""
    loaded: list[tuple[Path, dict]] = []
    for path in sorted(configs_dir.glob("*.json")):
        try:
            loaded.append((path, read_json(path)))
        except ConfigError:
            continue   # a broken file is reported by train.py when run directly, not offered here
    geometries = {_run_name(p, v): p for p, v in loaded if _mode(v) == "geometry_modeling"}
    recipes = [Recipe(p.name, (p,), (_mode(v),)) for p, v in loaded]
    for path, values in loaded:
        geometry = _geometry_for(values, geometries) if _mode(values) == "appearance_modeling" else None
        if geometry is not None:
            recipes.append(Recipe(f"{geometry.name}{SEQUENCE_ARROW}{path.name}", (geometry, path),
                                  ("geometry_modeling", "appearance_modeling")))
    return recipes


def default_recipe(recipes: list[Recipe], have_gpu: bool) -> Recipe:
    """Without a GPU only the tiny CPU demo finishes in minutes; with one, the first full config."""
    preferred = "tiny_cpu_geometry.json" if not have_gpu else "car_geometry.json"
    return next((r for r in recipes if r.label == preferred), recipes[0])
