"""Web app: `python app.py` serves a page on http://127.0.0.1:7860 to start and watch runs.

Every run is `python train.py --config <shipped config> key=value ...` in a subprocess, one at a
time per GPU. Needs `pip install -r requirements-app.txt`. Listens only on this machine unless
started with --listen (all interfaces) or --share (a public Gradio link).
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

# No usage reports from Gradio: the app may run where only the user should see what it does.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from config import DEVICES  # noqa: E402
from webapp.plan import ServerSettings  # noqa: E402
from webapp.service import AppOptions, Studio  # noqa: E402
from webapp.uploads import UploadLimits  # noqa: E402

# The page needs gradio, which is optional (requirements-app.txt): without it `python app.py` stops
# with its import error and the install command.
try:
    from webapp import ui
except ImportError as _error:
    ui = None
    _ui_import_error: ImportError | None = _error
else:
    _ui_import_error = None


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {text}")
    return value


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Web app: start text-to-3D runs of the shipped configs and watch them.")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--listen", action="store_true",
                   help="listen on all interfaces (0.0.0.0): anyone who reaches this machine can start runs")
    p.add_argument("--share", action="store_true",
                   help="also open a public Gradio link (anyone with it can start runs)")
    p.add_argument("--sd-model", default=None,
                   help="Stable Diffusion weights for every run (hub id or local folder); default: each config's")
    p.add_argument("--device", choices=DEVICES, default=None, help="device for every run; default: each config's")
    p.add_argument("--runs-dir", type=Path, default=Path("out") / "app",
                   help="where run folders go, one per job (default: out/app)")
    p.add_argument("--max-upload-mb", type=_positive, default=200.0, help="largest mesh upload accepted (default 200)")
    p.add_argument("--workers", type=int, default=None,
                   help="runs at once (default: one per visible GPU, one without a GPU)")
    return p.parse_args(argv)


def gpu_slots(workers: int | None, device: str | None) -> tuple[tuple[str | None, ...], bool]:
    """(one entry per worker: its CUDA_VISIBLE_DEVICES value or None, whether a GPU is used)."""
    count = 0
    if device != "cpu":
        count = torch.cuda.device_count()
    if count == 0:
        return (None,) * (workers or 1), False
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",") if visible else [str(i) for i in range(count)]
    n = workers or count
    return tuple(ids[i % count] for i in range(n)), True


def warn_if_exposed(args: argparse.Namespace) -> None:
    if not (args.listen or args.share):
        return
    places = (["on all network interfaces (0.0.0.0)"] if args.listen else []) + \
             (["through a public Gradio share link"] if args.share else [])
    where = " and ".join(places)
    bar = "!" * 78
    print(f"{bar}\n  WARNING: the app is reachable {where}.\n  Anyone who can open it can start GPU runs and "
          f"upload files. Stop it with Ctrl-C.\n{bar}", file=sys.stderr, flush=True)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def make_studio(args: argparse.Namespace) -> tuple[Studio, bool]:
    """The app's runs and uploads as the command line sets them; whether runs use a GPU."""
    # Runs start in the project folder: a local model folder named relative to here must stay found.
    model = args.sd_model
    if model and Path(model).exists():
        model = str(Path(model).resolve())
    slots, have_gpu = gpu_slots(args.workers, args.device)
    opts = AppOptions(ServerSettings(args.runs_dir.resolve(), model, args.device),
                      UploadLimits(max_mb=args.max_upload_mb), slots)
    return Studio(opts), have_gpu


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if ui is None:
        print(f"error: the web app needs gradio ({_ui_import_error}); pip install -r requirements-app.txt",
              file=sys.stderr)
        return 2
    studio, have_gpu = make_studio(args)
    # SIGTERM (a service manager, a test) stops like Ctrl-C, so runs are stopped and uploads removed.
    signal.signal(signal.SIGTERM, _interrupt)
    warn_if_exposed(args)
    runs_dir = studio.opts.server.runs_dir
    print(f"runs go to {runs_dir}; {len(studio.opts.slots)} at a time", flush=True)
    try:
        ui.launch(ui.build(studio, have_gpu), "0.0.0.0" if args.listen else "127.0.0.1", args.port,
                  args.share, args.max_upload_mb, runs_dir)
    except KeyboardInterrupt:
        pass
    finally:
        studio.close()
    return 0

if __name__ == "__main__":
    sys.exit(main())
