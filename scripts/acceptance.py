"""Issue 9's acceptance ledger: every committed full-scale evaluation, grouped by setting and held
against the issue's bars.

    python scripts/acceptance.py docs/benchmarks/quality --markdown docs/benchmarks/quality/ACCEPTANCE.md \
        --out docs/benchmarks/quality/acceptance.json

Reads every ``eval_*.json`` that ``scripts/full_scale_quality.sh`` wrote under the folder (the
training command and the ``scripts/evaluate.py`` result). A setting is what the command fixes
apart from the seed: reference, config (schedule), grid, elevation range, views per optimizer step
(``emulate_gpus`` or the number of processes) and the remaining overrides (the "recipe"). Runs of
one setting with different seeds, sessions or code versions are counted together; the sessions
column says where they came from. Bars (issue 9): geometry Chamfer <= 1% of the reference's
diagonal and IoU >= 0.90; appearance PSNR >= 30 dB on the held-out views.

A queued run that failed before its evaluation (e.g. its surface vanished) has no eval file; it is
counted as a failed run of its setting when its queue line (``queue*.txt``) and a ``TAG.error`` file
or a ``TAG failed`` line in ``failed.txt`` sit in the same folder. Earlier failures recorded only in
the sessions' READMEs are not counted.
"""
from __future__ import annotations

import argparse
import functools
import json
import re
import shlex
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]

MAX_CHAMFER = 0.01      # of the reference's bounding-box diagonal
MIN_IOU = 0.90
MIN_PSNR = 30.0         # dB, albedo on 8 held-out views
# A pass this close to a bar is named beside the verdict: another seed may well fall on the other side.
NEAR_CHAMFER = 0.9 * MAX_CHAMFER
NEAR_IOU = MIN_IOU + 0.01
NEAR_PSNR = MIN_PSNR + 1.0
# Overrides that say what is evaluated or how it is logged, not how it is trained; the setting's
# other fields (grid, cameras, views, seed) are read from their own keys.
NOT_RECIPE = {"guidance", "target_mesh", "base_mesh", "video_frames", "validate", "out_dir", "seed",
              "dmtet_grid", "elevation_range", "emulate_gpus"}


@dataclass(frozen=True, order=True)
class Setting:
    reference: str
    config: str
    grid: int | None          # None for appearance runs (fixed mesh)
    cameras: str              # elevation range in degrees, e.g. "-10..45"
    views: int                # GPUs whose views one optimizer step sees
    recipe: str               # the other overrides, "published" when none


@dataclass
class Run:
    path: str
    session: str
    seed: int
    chamfer: float | None
    iou: float | None
    psnr: float | None
    passed: bool
    failed: bool = False      # ended before its evaluation (no mesh to measure)


def parse_command(command: str) -> tuple[str, dict[str, str], int]:
    """(config path, key=value overrides, processes) of a recorded training command."""
    words = shlex.split(command)
    procs = 1
    config, overrides = "", {}
    for i, w in enumerate(words):
        if w.startswith("--nproc_per_node="):
            procs = int(w.split("=", 1)[1])
        elif w == "--config" and i + 1 < len(words):
            config = words[i + 1]
        elif "=" in w and not w.startswith("-"):
            key, value = w.split("=", 1)
            overrides[key] = value
    if not config:
        raise ValueError(f"no --config in the recorded command {command!r}")
    return config, overrides, procs


@functools.cache
def _config(config: str) -> dict:
    """The config file's keys ({} when it is not in this tree); read once per file, not per run."""
    path = Path(config) if Path(config).is_absolute() else PROJECT_ROOT / config
    return json.loads(path.read_text()) if path.is_file() else {}


def _config_value(config: str, key: str):
    return _config(config).get(key)


def _elevation(text_or_list) -> str:
    lo, hi = json.loads(text_or_list) if isinstance(text_or_list, str) else text_or_list
    return f"{lo:g}..{hi:g}"


def passes(ev: dict) -> bool:
    """Issue 9's bars for one evaluation: PSNR for appearance (albedo), Chamfer and IoU for geometry."""
    if ev.get("image_kind") == "albedo":
        return ev.get("psnr", 0.0) >= MIN_PSNR
    return ev["chamfer"] <= MAX_CHAMFER and ev["iou"] >= MIN_IOU


def near_bar(run: Run) -> list[str]:
    """The values of a passing run that are close to their bar (NEAR_*), formatted for the ledger."""
    if not run.passed:
        return []
    near = []
    if run.chamfer is not None and run.chamfer > NEAR_CHAMFER:
        near.append(f"Chamfer {100 * run.chamfer:.3f}%")
    if run.iou is not None and run.iou < NEAR_IOU:
        near.append(f"IoU {run.iou:.3f}")
    if run.chamfer is None and run.psnr is not None and run.psnr < NEAR_PSNR:   # appearance: PSNR is the bar
        near.append(f"PSNR {run.psnr:.1f} dB")
    return near


def read_run(path: Path, root: Path) -> tuple[Setting, Run] | None:
    """The setting and result of one eval file; None for files without a recorded command (CPU
    stand-ins and hand-run evaluations)."""
    try:
        data = json.loads(path.read_text())
        if "command" not in data or "eval" not in data:
            return None
        return _setting_and_run(data["command"], data["eval"], path, root)
    except (KeyError, ValueError) as e:   # JSONDecodeError is a ValueError
        raise ValueError(f"{path}: cannot read it as a scripts/full_scale_quality.sh evaluation ({e!r})") from e


def _setting(config: str, over: dict[str, str], procs: int, reference: str, appearance: bool) -> Setting:
    grid = None if appearance else int(over.get("dmtet_grid", _config_value(config, "dmtet_grid") or 128))
    elevation = over.get("elevation_range", _config_value(config, "elevation_range") or [-10, 45])
    recipe = " ".join(f"{k}={v}" for k, v in sorted(over.items()) if k not in NOT_RECIPE) or "published"
    return Setting(reference=Path(reference).stem, config=Path(config).stem, grid=grid,
                   cameras=_elevation(elevation), views=int(over.get("emulate_gpus", procs)), recipe=recipe)


def _run(path: Path, root: Path, config: str, over: dict[str, str], **result) -> Run:
    rel = path.relative_to(root)
    return Run(path=str(rel), session=rel.parts[0] if len(rel.parts) > 1 else "-",
               seed=int(over.get("seed", _config_value(config, "seed") or 42)), **result)


def _setting_and_run(command: str, ev: dict, path: Path, root: Path) -> tuple[Setting, Run]:
    config, over, procs = parse_command(command)
    appearance = ev.get("image_kind") == "albedo"
    run = _run(path, root, config, over, chamfer=None if appearance else ev["chamfer"],
               iou=None if appearance else ev["iou"], psnr=ev.get("psnr"), passed=passes(ev))
    return _setting(config, over, procs, ev["reference"], appearance), run


# scripts/full_scale_quality.sh's geometry jobs: [p]grid<N>_<ref>[_e<K>] and custom_<ref>[_e<K>]
GEOMETRY_JOB = re.compile(r"^(?:(?P<p>p?)grid(?P<grid>\d+)|(?P<custom>custom))_(?P<ref>.+?)(?:_e(?P<k>\d+))?$")
JOB_CONFIGS = {"": "configs/car_geometry.json", "p": "configs/pineapple_geometry_single_gpu.json",
               "custom": "configs/user_mesh_geometry.json"}


def failed_queue_runs(folder: Path, root: Path) -> list[tuple[Setting, Run]]:
    """Geometry runs of the folder's queue files that failed before their evaluation."""
    failed = {p.name[:-len(".error")] for p in folder.glob("*.error")}
    if (folder / "failed.txt").is_file():
        failed |= {line.split()[0] for line in (folder / "failed.txt").read_text().splitlines() if line.strip()}
    found = []
    for queue in sorted(folder.glob("queue*.txt")):
        for line in queue.read_text().splitlines():
            words = line.split()
            if len(words) < 3 or words[0] != "quality" or words[1] not in failed:
                continue
            m = GEOMETRY_JOB.match(words[2])
            if m is None or (folder / f"eval_{words[1]}.json").exists():
                continue
            config = JOB_CONFIGS[m["custom"] or m["p"]]
            over = dict(w.split("=", 1) for w in words[3:])
            if not m["custom"]:
                over["dmtet_grid"] = m["grid"]
            if m["k"]:
                over["emulate_gpus"] = m["k"]
            run = _run(queue.with_name(f"{words[1]}.error"), root, config, over,
                       chamfer=None, iou=None, psnr=None, passed=False, failed=True)
            found.append((_setting(config, over, 1, m["ref"], appearance=False), run))
    return found


def collect(root: Path) -> dict[Setting, list[Run]]:
    groups: dict[Setting, list[Run]] = {}
    found = [read_run(p, root) for p in sorted(root.rglob("eval_*.json"))]
    for folder in sorted({p.parent for p in root.rglob("queue*.txt")}):
        found += failed_queue_runs(folder, root)
    for setting, run in filter(None, found):
        groups.setdefault(setting, []).append(run)
    return groups


def summary(setting: Setting, runs: list[Run]) -> dict:
    def span(values: list[float]) -> list[float] | None:
        return [min(values), statistics.median(values), max(values)] if values else None
    return {"setting": asdict(setting), "runs": len(runs), "passed": sum(r.passed for r in runs),
            "failed_before_evaluation": sum(r.failed for r in runs),
            "iou_min_median_max": span([r.iou for r in runs if r.iou is not None]),
            "chamfer_max": max((r.chamfer for r in runs if r.chamfer is not None), default=None),
            "psnr_min": min((r.psnr for r in runs if r.psnr is not None), default=None),
            "seeds": sorted({r.seed for r in runs}), "sessions": sorted({r.session for r in runs}),
            "files": [r.path for r in runs]}


def verdicts(groups: dict[Setting, list[Run]]) -> dict[str, str]:
    """Per reference (per config for appearance, one per SDS strategy): 'every run passes' with
    the setting that has the most runs, all passing; else 'some runs pass'; else 'no run passes'.
    Geometry counts only grid-128 settings, the grid the issue's bar is set at."""
    best: dict[str, tuple[int, Setting]] = {}
    some: set[str] = set()
    keys: set[str] = set()
    for s in sorted(groups):
        if s.grid not in (None, 128):
            continue
        key = s.reference if s.grid else f"{s.reference} ({s.config})"
        keys.add(key)
        runs = groups[s]
        n_pass = sum(r.passed for r in runs)
        if n_pass:
            some.add(key)
        if n_pass == len(runs) and len(runs) > best.get(key, (0, s))[0]:
            best[key] = (len(runs), s)

    def describe(n: int, s: Setting) -> str:
        return (f"every run passes ({n} run{'s' * (n > 1)}): {s.config}, elevation {s.cameras}, "
                f"{s.views} GPUs' views per step, {s.recipe}")
    return {k: describe(*best[k]) if k in best else "some runs pass" if k in some else "no run passes"
            for k in sorted(keys)}


# Issue 9's acceptance: one reference for each kind the issue names (scope 2) and one per SDS strategy,
# each held to the shipped config as it is: grid 128, the config's cameras and GPUs' views, and the
# shipped defaults. For geometry those are the published recipe with three keys of ours at their
# defaults: the 2000-step SDF pretraining (since 9ce19e7), the sealed-air term (since session 16) and
# the coarse stage's 5 hash-grid levels (since session 21). The runs write them out (in sorted order,
# as Setting.recipe lists them), so runs under older defaults ("published" before session 15,
# "sdf_init_iter=2000" alone, "sdf_init_iter=2000 sealed_air=1" before session 21) are not counted as
# the shipped ones.
SHIPPED_GEOMETRY = "sdf_init_iter=2000 sdf_levels_coarse=5 sealed_air=1"


@dataclass(frozen=True)
class Criterion:
    what: str                 # what the issue asks for
    setting: Setting
    limit: str = ""           # non-empty: reported beside the acceptance, not part of it, because of this

    @property
    def reported(self) -> bool:
        """Asked to be reported (grid 256), not held to the bars, which are set at grid 128."""
        return self.setting.grid not in (128, None)


def _geometry(what: str, reference: str, config: str = "car_geometry", limit: str = "", grid: int = 128) -> Criterion:
    return Criterion(what, Setting(reference, config, grid, "-10..45", 8, SHIPPED_GEOMETRY), limit)


def _appearance(strategy: int, config: str, views: int) -> Criterion:
    return Criterion(f"appearance, SDS strategy {strategy}",
                     Setting("textured", config, None, "-10..45", views, "published"))


CREASE = ("a flat floor meets its wall at a crease: raising it changes only which pixels show floor or wall, and "
          "rasterized normals give no gradient there (session6/README.md), so a plate over the floor looks like "
          "the floor in every normal image")
ACCEPTANCE = (
    _geometry("genus >= 1", "torus"),
    _geometry("thin parts", "thin_parts"),
    _geometry("concave cavity", "bowl"),
    _geometry("custom_mesh init (from a coarse target)", "bowl", config="user_mesh_geometry"),
    _appearance(0, "car_appearance_strategy0", 8),
    _appearance(1, "car_appearance_strategy1", 8),
    _appearance(2, "pineapple_appearance_strategy2_single_gpu", 1),
    _geometry("concave cavity with a creased floor", "cup", limit=CREASE),
    _geometry("the same from a coarse cup (custom_mesh init)", "cup", config="user_mesh_geometry", limit=(
        "as for the cup above; from the right start too the plate forms (session16, custom_cup_D: 0.882), so it "
        "comes from the guidance, not from carving the cavity")),
    _geometry("deep cavity", "mug", limit=(
        "11-13% of its surface, the cavity's lower part, is seen by no camera at -10..45 (session13/visibility.txt), "
        "so what fills it there is the prior's guess, not recovery; carving by those cameras bounds the IoU at 0.79. "
        "It is measured at -10..80 instead (table below)")),
    # "report grid 256 too": the geometry criteria's references at grid 256, same recipe and cameras.
    _geometry("genus >= 1", "torus", grid=256),
    _geometry("thin parts", "thin_parts", grid=256),
    _geometry("concave cavity", "bowl", grid=256),
)


# Rows without runs at the shipped recipe list their newest runs at other recipes, this many (the cup
# was tuned over dozens).
OTHER_RECIPES_SHOWN = 3


def acceptance(groups: dict[Setting, list[Run]]) -> list[dict]:
    """Each criterion's runs at its setting: it holds when there is a run and every run passes."""
    rows = []
    for c in ACCEPTANCE:
        runs = groups.get(c.setting, [])
        d = summary(c.setting, runs)
        others = [] if runs else _other_recipes(groups, c.setting)
        rows.append({"what": c.what, "reference": c.setting.reference, "limit": c.limit, "reported": c.reported, **d,
                     "holds": bool(runs) and all(r.passed for r in runs),
                     "near_bar": [v for r in runs for v in near_bar(r)],
                     "other_recipes": others[:OTHER_RECIPES_SHOWN],
                     "other_recipes_not_shown": len(others[OTHER_RECIPES_SHOWN:])})
    return rows


def _other_recipes(groups: dict[Setting, list[Run]], setting: Setting) -> list[dict]:
    """The runs of `setting` but for the recipe: what a criterion without runs at the shipped recipe
    (e.g. just after a default changed) was measured at before, newest session first."""
    others = [summary(s, runs) for s, runs in groups.items()
              if s != setting and replace(s, recipe=setting.recipe) == setting]
    def newest(d: dict) -> tuple[int, str]:
        return max(int("0" + "".join(filter(str.isdigit, x))) for x in d["sessions"]), d["setting"]["recipe"]
    return sorted(others, key=newest, reverse=True)


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _chamfer_max(summary_row: dict) -> str:
    return "-" if summary_row["chamfer_max"] is None else f"{100 * summary_row['chamfer_max']:.3f}%"


def acceptance_markdown(rows: list[dict]) -> list[str]:
    def row(d: dict) -> str:
        s = d["setting"]
        iou = "-" if d["iou_min_median_max"] is None else f"{d['iou_min_median_max'][0]:.3f}"
        chamfer = _chamfer_max(d)
        verdict = ("yes, near a bar" if d["near_bar"] else "yes") if d["holds"] else \
            "no runs" if not d["runs"] else "no"
        return (f"| {d['what']} | {d['reference']} | {s['config']} | {s['views']} | {d['passed']} / {d['runs']} | "
                f"{iou} | {chamfer} | {_fmt(d['psnr_min'], '.1f')} | {', '.join(map(str, d['seeds'])) or '-'} | "
                f"{verdict} |")
    head = ["| asks for | reference | config | views | passed / runs | IoU min | Chamfer max | PSNR min | seeds "
            "| holds |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    required = [d for d in rows if not d["limit"] and not d["reported"]]
    failing = [d["what"] for d in required if not d["holds"]]
    near = [f"{d['what']} ({', '.join(d['near_bar'])})" for d in required if d["holds"] and d["near_bar"]]
    lines = ["## Acceptance at the shipped defaults", "",
             "Grid 128, 512^2, each config's published cameras (-10..45) and GPUs' views per step; geometry with "
             f"the shipped recipe (`{SHIPPED_GEOMETRY}`: our keys at their defaults, written out by the runs), "
             "appearance with the configs unchanged. A criterion holds when it has runs and every one passes.", "",
             *head, *map(row, required), *_other_recipe_lines(required), "",
             "**Every criterion holds.**" if not failing else f"**Not holding: {'; '.join(failing)}.**"]
    if near:
        lines += ["", f"Passing near a bar (Chamfer above {100 * NEAR_CHAMFER:.1f}%, IoU below {NEAR_IOU:.2f}, "
                  f"PSNR below {NEAR_PSNR:.0f} dB), so another seed may fail: {'; '.join(near)}."]
    limits = [d for d in rows if d["limit"]]
    grid256 = [d for d in rows if d["reported"]]
    if grid256:
        lines += ["", "### Grid 256 at the shipped recipe (reported; the bars are set at grid 128)", "",
                  "Same cameras, views and recipe as above; \"holds\" reads the grid-128 bars.", "",
                  *head, *map(row, grid256), *_other_recipe_lines(grid256)]
    if limits:
        lines += ["", "### Limits, reported beside the acceptance", "", *head, *map(row, limits),
                  *_other_recipe_lines(limits), ""]
        lines += [f"- {d['what']} ({d['reference']}): {d['limit']}." for d in limits]
    return lines


def _other_recipe_lines(rows: list[dict]) -> list[str]:
    """For the rows without runs at the shipped recipe: their runs at other recipes, newest first."""
    def one(d: dict) -> str:
        iou = "-" if d["iou_min_median_max"] is None else f"IoU min {d['iou_min_median_max'][0]:.3f}"
        return (f"`{d['setting']['recipe']}` {d['passed']} / {d['runs']} passed, {iou}, Chamfer max {_chamfer_max(d)} "
                f"({', '.join(d['sessions'])})")
    def more(d: dict) -> str:
        n = d["other_recipes_not_shown"]
        return f"; {n} more in \"Every setting\"" if n else ""
    lines = [f"- {d['what']} ({d['reference']}): no run at the shipped recipe yet; at other recipes: "
             f"{'; '.join(map(one, d['other_recipes']))}{more(d)}."
             for d in rows if d["other_recipes"]]
    return ["", *lines] if lines else []


def markdown(groups: dict[Setting, list[Run]]) -> str:
    lines = ["# Issue 9 acceptance ledger", "",
             "Generated by `python scripts/acceptance.py docs/benchmarks/quality --markdown "
             "docs/benchmarks/quality/ACCEPTANCE.md --out docs/benchmarks/quality/acceptance.json` from every "
             "committed `eval_*.json` with its training command, and the queued runs that failed before their "
             "evaluation (counted as failed; \"(n failed)\"). Bars: Chamfer <= 1% of the diagonal and IoU >= "
             "0.90 (geometry), albedo PSNR >= 30 dB (appearance); a geometry row's PSNR is of normal images, "
             "reported, not a bar. Runs of different sessions ran different code "
             "versions; the sessions' READMEs say what changed.", ""]
    lines += acceptance_markdown(acceptance(groups))
    lines += ["", "## Per reference (grid 128): the setting with the most runs, all passing", ""]
    lines += [f"- **{ref}**: {v}" for ref, v in verdicts(groups).items()]
    lines += ["", "## Every setting", "",
              "| reference | config | grid | elevation | views | recipe | passed / runs | IoU min / median / max "
              "| Chamfer max | PSNR min | seeds | sessions |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for s in sorted(groups, key=lambda s: (s.reference, s.grid or 0, s.cameras, s.config, s.views, s.recipe)):
        d = summary(s, groups[s])
        iou = "-" if d["iou_min_median_max"] is None else " / ".join(f"{v:.3f}" for v in d["iou_min_median_max"])
        chamfer = _chamfer_max(d)
        failed = f" ({d['failed_before_evaluation']} failed)" if d["failed_before_evaluation"] else ""
        lines.append(f"| {s.reference} | {s.config} | {s.grid or '-'} | {s.cameras} | {s.views} | {s.recipe} | "
                     f"{d['passed']} / {d['runs']}{failed} | {iou} | {chamfer} | {_fmt(d['psnr_min'], '.1f')} | "
                     f"{', '.join(map(str, d['seeds']))} | {', '.join(d['sessions'])} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", help="folder searched for eval_*.json (e.g. docs/benchmarks/quality)")
    parser.add_argument("--out", help="write the grouped results as JSON here")
    parser.add_argument("--markdown", help="write the ledger as Markdown here (default: print it)")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a folder; pass the folder that holds the eval_*.json files", file=sys.stderr)
        return 2
    try:
        groups = collect(root)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not groups:
        print(f"error: no eval_*.json with a recorded training command under {root}", file=sys.stderr)
        return 1
    text = markdown(groups)
    if args.markdown:
        Path(args.markdown).write_text(text)
    else:
        print(text, end="")
    if args.out:
        data = {"bars": {"chamfer_max": MAX_CHAMFER, "iou_min": MIN_IOU, "psnr_min": MIN_PSNR},
                "acceptance": acceptance(groups), "verdicts": verdicts(groups), "settings": [summary(s, r) for s, r in sorted(groups.items())]}
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
