"""Generate docs/CONFIG.md, the reference of every config key, from config.py.

    python scripts/config_doc.py            # rewrite docs/CONFIG.md
    python scripts/config_doc.py --check    # exit 1 when docs/CONFIG.md is stale
    python scripts/config_doc.py --out PATH # write (or, with --check, compare) another file

The keys' types, defaults, accepted values, origin (published Fantasia3D key or ours), groups and
meanings all come from `config.config_fields()`, so edit a key's documentation in config.py and
rerun this script. The output is deterministic (declaration order, no dates).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from config import KeyDoc, config_fields  # noqa: E402

DEFAULT_OUT = ROOT / "docs" / "CONFIG.md"
COLUMNS = ("key", "type", "default", "accepts", "origin", "meaning")

HEADER = """\
# Configuration keys

<!-- Generated from config.py by scripts/config_doc.py: edit the keys' docs there, not here. -->

This file is generated from `config.py`: `python scripts/config_doc.py` rewrites it, and
`python scripts/config_doc.py --check` exits 1 when it is stale (the tests run that check).

## How a config is read

- `python train.py --config FILE.json [--check] [key=value ...]`, also under
  `torchrun --nproc_per_node=N train.py --config FILE.json`.
- A config is a flat JSON object. Every key is optional: a key left out takes the default below
  (for a published key, its published default).
- `key=value` arguments after `--config` override the file: the command line wins. A value is read
  as JSON when it parses as JSON (`batch=4`, `train_res=[256,256]`, `validate=false`,
  `display_res=null`), else it is taken as a string (`text=a red car`, quoted for the shell).
- Unknown keys, wrong types or lengths, out-of-range values and keys that contradict each other stop
  the run before anything is loaded: one line on stderr names the key, where it came from (the file
  or the command line), what was expected and what was got, and the exit code is 2. An unknown key
  names the nearest valid one, e.g. `unknown config key 'guidance_wieght' in car.json; did you mean
  'guidance_weight'?`. Rules between keys: `coarse_iter <= iter`; `kd_min <= kd_max`,
  `ks_min <= ks_max` and `nrm_min <= nrm_max` per channel; `text` is required with
  `guidance=stable_diffusion` and `target_mesh` with `guidance=target_mesh`; `learn_light` and
  `camera_space_light` must be false and `layers` 1.
- Files the config needs must exist, or the run stops the same way (exit code 2): `base_mesh` for
  appearance and for `sdf_init_shape=custom_mesh`, `target_mesh` for `guidance=target_mesh`, and
  `envmap` and `relight` when set (they must also be readable HDR files).
- `--check` only validates: it prints the resolved config (the defaults, overridden by the file,
  overridden by the command line) as JSON and exits 0.
- Errors found once training has started (missing diffusion weights, an empty surface, ...) exit
  with code 1.
- Run folder: a relative `out_dir` goes under `./out/` in the working directory, an absolute one is
  used as is; without `out_dir`, the config file's name (without `.json`) is used under `./out/`.
  The resolved config is written there as `config.json` before training, and into every
  checkpoint.
- Relative file paths in a config (`base_mesh`, `target_mesh`, `envmap`, `relight`, `resume`, the
  `relight` layers of `display`) are looked up in the working directory, then in the project folder.
- Origin: *published* keys are those of the published Fantasia3D configs and command line, accepted
  with their published default (their meaning says when they are accepted but not used); *ours*
  are keys this project added. "As published" marks the value that behaves like the published code.
"""


def cell(text: str) -> str:
    """Text safe inside a Markdown table cell: no pipes, no line breaks, no HTML tags."""
    text = " ".join(text.split()).replace("|", "\\|")
    return re.sub(r"<(?=[A-Za-z/!?])", "&lt;", text)


def code(text: str) -> str:
    return f"`{cell(text)}`"


def slug(title: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def title(section: str) -> str:
    return section[:1].upper() + section[1:]


def row(key: KeyDoc) -> str:
    cells = (code(key.name), code(key.type), code(json.dumps(key.default)), cell(key.accepts),
             "ours" if key.ours else "published", cell(key.doc))
    return "| " + " | ".join(cells) + " |"


def sections(keys: list[KeyDoc]) -> dict[str, list[KeyDoc]]:
    """Keys by group, groups in the order config.py declares them."""
    groups: dict[str, list[KeyDoc]] = {}
    for key in keys:
        groups.setdefault(key.section, []).append(key)
    return groups


def contents(groups: dict[str, list[KeyDoc]], keys: list[KeyDoc]) -> list[str]:
    ours = sum(key.ours for key in keys)
    lines = ["## Keys", "", f"{len(keys)} keys: {len(keys) - ours} published, {ours} ours.", ""]
    lines += [f"- [{title(name)}](#{slug(title(name))}) ({len(group)})" for name, group in groups.items()]
    return lines


def table(name: str, group: list[KeyDoc]) -> list[str]:
    head = "| " + " | ".join(COLUMNS) + " |"
    rule = "|" + "|".join(" --- " for _ in COLUMNS) + "|"
    return ["", f"## {title(name)}", "", head, rule, *(row(key) for key in group)]


def render(keys: list[KeyDoc]) -> str:
    groups = sections(keys)
    lines = [HEADER.rstrip("\n"), "", *contents(groups, keys)]
    for name, group in groups.items():
        lines += table(name, group)
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Generate docs/CONFIG.md from config.py.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file differs from the generated text")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"file to write or check (default {DEFAULT_OUT})")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    keys = config_fields()
    text = render(keys)
    if args.check:
        if not args.out.is_file() or args.out.read_text() != text:
            print(f"{args.out} is stale: run `python scripts/config_doc.py`", file=sys.stderr)
            return 1
        print(f"{args.out} is up to date ({len(keys)} keys)")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(keys)} keys)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
