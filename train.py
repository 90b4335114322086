"""Fantasia3D-style text-to-3D: `python train.py --config X.json [--check] [key=value ...]`.

Also under torchrun: `torchrun --nproc_per_node=N train.py --config X.json`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# CPU runs: OpenMP threads that spin while waiting make every small op ~20x slower as soon as
# another process shares the cores (torchrun on CPU, a busy machine). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from config import ConfigError, load_config
from preflight import preflight


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Text-to-3D with DMTet geometry and PBR appearance by score distillation.",
        epilog="Overrides: key=value after --config win over the file; values are JSON when they "
               "parse as JSON (batch=4, train_res=[256,256], validate=false), else strings.")
    parser.add_argument("--config", required=True, help="JSON config (published Fantasia3D keys accepted)")
    parser.add_argument("--check", action="store_true",
                        help="validate, print the resolved config as JSON and exit (no GPU, no network)")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_config(args.config, args.overrides)
        # Before any model loads, for a run and --check alike: a bad file, run folder, model
        # folder or a missing package the config asks for costs a second and leaves nothing behind (exit 2).
        preflight(cfg, args.config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.check:
        print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    import trainer  # only to train: torch and diffusers load in seconds that --check and config errors must not cost
    return trainer.run(cfg, config_path=args.config)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:   # Ctrl-C while torch imports, before trainer.run handles signals
        print("stopped by SIGINT while starting: nothing was written", file=sys.stderr)
        sys.exit(130)
