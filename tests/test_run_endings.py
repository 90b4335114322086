"""Every run ends cleanly: interrupts (SIGINT, SIGTERM, a second SIGINT, SIGKILL) at each part of
a run, out of GPU memory, and a failing process of a torchrun group.

Each ending is checked for what the user sees (one line, no traceback, the documented exit code),
what the run folder says (status.json, a log with each iteration once, an intact checkpoint) and
that `resume=auto` continues from it: one run folder goes through every ending in turn and then
finishes with exactly the mesh of an uninterrupted run. The moments are exact: the F3D_TEST_FAULT
hook (faults.py) makes the run signal itself at a named point.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import trimesh

import distributed
import faults
from config import build_config
from phases import GeometryPhase
from run_log import rewrite_log
from run_status import (RunInterrupted, RunProgress, RunSignals, RunStatus, failed, stopped_at_once,
                        stopped_between_steps)
from tests.run_helpers import read_log, run_train
from trainer import out_of_memory_message

ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = ROOT / "configs" / "tiny_cpu_geometry.json"
# The tiny demo config, shortened: 10 iterations with a checkpoint every 2, and a short pretraining
# of a larger ellipsoid (80 steps leave a loose fit, but a surface: the run only has to be the same
# with and without interrupts). No video and no TensorBoard: no ending below is in the video, and
# TensorBoard's import costs each process seconds (the one ending that still writes to it turns it
# on).
ITERATIONS = 10
CONTINUED = ITERATIONS + 4          # the straight run continued: see _continued_from
SHORT = [f"iter={ITERATIONS}", "coarse_iter=3", "save_interval=2", "sdf_init_iter=80",
         "sdf_init_shape_scale=[1,1,1]", "validate=false", "video_frames=0", "tensorboard=off"]


# ------------------------------------------------------------------------------------------------
# Quick: the pieces
# ------------------------------------------------------------------------------------------------
def test_fault_spec_parses_and_rejects_typos() -> None:
    assert faults.parse("pretrain:10:SIGINT, checkpoint:4:SIGKILL:1") == [
        faults.Fault("pretrain", 10, "SIGINT"), faults.Fault("checkpoint", 4, "SIGKILL", 1)]
    with pytest.raises(ValueError, match="POINT:N:ACTION"):
        faults.parse("train:3:SIGHUP")


def test_log_is_rewritten_to_the_starting_iteration(tmp_path: Path) -> None:
    """A run killed after its checkpoint of iteration 2 had logged 1..3 and half a line; resumed
    twice over, the log holds each iteration once, the later record winning."""
    log = tmp_path / "log.jsonl"
    lines = [json.dumps({"it": i, "loss": i}) for i in (1, 2, 3)] + [json.dumps({"it": 2, "loss": 20})]
    log.write_text("\n".join(lines) + '\n{"it": 4, "lo')
    rewrite_log(log, 2)
    assert [json.loads(x) for x in log.read_text().splitlines()] == [{"it": 1, "loss": 1}, {"it": 2, "loss": 20}]
    rewrite_log(log, 0)                                     # a fresh run: an empty log
    assert log.read_text() == "" and not (tmp_path / "log.jsonl.tmp").exists()


def test_first_signal_in_the_loop_asks_for_a_stop_and_a_second_sigint_stops_at_once() -> None:
    with RunSignals(announce=False) as signals:
        with pytest.raises(RunInterrupted) as outside:      # pretraining, export: nothing to finish
            signal.raise_signal(signal.SIGTERM)
        assert outside.value.signum == signal.SIGTERM
        with signals.stopping_at_steps():
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)             # Slurm and torchrun both send it: one request
            assert signals.requested == signal.SIGTERM
            with pytest.raises(RunInterrupted):
                signal.raise_signal(signal.SIGINT)          # Ctrl-C on top: quit now


def test_signals_held_during_a_checkpoint_act_after_it() -> None:
    with RunSignals(announce=False) as signals:
        with pytest.raises(RunInterrupted):
            with signals.held():
                signal.raise_signal(signal.SIGINT)
                done = True                                 # the held section runs to its end
        assert done
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # handlers restored


def test_endings_say_what_was_saved_and_how_to_continue(tmp_path: Path) -> None:
    run = RunProgress(total=40, activity="SDF pretraining")
    end = stopped_at_once(signal.SIGINT, run)
    assert (end.state, end.exit_code) == ("interrupted", 130)
    assert "nothing to resume from" in end.message and "starts over" in end.message
    run.activity, run.iteration, run.checkpoint_it, run.checkpoint_path = "the export", 40, 40, tmp_path / "last.pt"
    end = stopped_at_once(signal.SIGTERM, run)
    assert end.exit_code == 143 and "iteration 40" in end.message and "resume=auto to export" in end.message
    run.iteration = run.checkpoint_it = 12
    end = stopped_between_steps(signal.SIGTERM, run)
    assert "after iteration 12 of 40" in end.message and "not exported" in end.message
    assert "resume=auto" in end.message and "\n" not in end.message
    assert "resume=auto continues" in failed("out of GPU memory", run, 3, resumable=True).message


def test_status_json_is_written_only_once_the_run_folder_exists(tmp_path: Path) -> None:
    status = RunStatus(tmp_path / "run" / "status.json")
    status.write("running", RunProgress(total=5))
    assert not (tmp_path / "run").exists()                 # a config error leaves no folder
    status.enabled = True
    status.write("interrupted", RunProgress(total=5, iteration=3, checkpoint_it=2), "msg", 130, signal.SIGINT)
    data = json.loads((tmp_path / "run" / "status.json").read_text())
    assert data["state"] == "interrupted" and data["iteration"] == 3 and data["checkpoint_iteration"] == 2
    assert data["exit_code"] == 130 and data["signal"] == "SIGINT" and data["pid"] == os.getpid()


def test_out_of_memory_message_names_the_sizes_and_the_keys() -> None:
    cfg = build_config({"mode": "geometry_modeling", "text": "a cup", "batch": 4, "train_res": [512, 512],
                        "dmtet_grid": 256})
    info = distributed.DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    run = RunProgress(total=cfg.iter, activity="training iteration 7 (geometry_fine stage)")
    message = out_of_memory_message(cfg, info, run)
    for part in ("iteration 7 (geometry_fine stage)", "batch 4", "train_res [512, 512]", "dmtet_grid 256",
                 "GPU memory in use", "Lower batch", "dmtet_grid (256 -> 128)", "emulate_gpus"):
        assert part in message, (part, message)
    appearance = build_config({"mode": "appearance_modeling", "text": "a cup", "base_mesh": "m.obj",
                               "texture_res": [2048, 2048]})
    message = out_of_memory_message(appearance, info, RunProgress(total=appearance.iter, activity="the export"))
    assert "during the export" in message and "texture_res [2048, 2048]" in message and "dmtet_grid" not in message


# ------------------------------------------------------------------------------------------------
# Slow: interrupts of a real run, then resume=auto
# ------------------------------------------------------------------------------------------------
def _train_process(run_dir: Path, tiny_sd: Path, fault: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    env.pop(faults.ENV, None)
    if fault:
        env[faults.ENV] = fault
    cmd = [sys.executable, "train.py", "--config", str(TINY_CONFIG), f"sd_model={tiny_sd}",
           f"out_dir={run_dir}", *SHORT, *extra]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _mesh(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    mesh = trimesh.load(run_dir / "dmtet_mesh" / "mesh.obj", force="mesh", process=False)
    return np.asarray(mesh.vertices), np.asarray(mesh.faces)


def _status(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "status.json").read_text())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory: pytest.TempPathFactory, tiny_sd_path: Path) -> Path:
    """The uninterrupted run (in this process: its imports are paid once). Its folder also seeds
    the runs below that only need a trained checkpoint."""
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    assert run_train(TINY_CONFIG, f"sd_model={tiny_sd_path}", f"out_dir={run_dir}", *SHORT) == 0
    assert _status(run_dir)["state"] == "finished" and _status(run_dir)["exit_code"] == 0
    assert [r["it"] for r in read_log(run_dir)] == list(range(1, ITERATIONS + 1))
    assert len(_mesh(run_dir)[1]) > 100                    # a surface, not an empty export
    return run_dir


def _continued_from(straight: Path, tmp_path: Path) -> Path:
    """A copy of the finished straight run, to be continued past its end (iter=CONTINUED): such a
    run starts at its first training step, where the endings below happen, with no SDF pretraining
    before it. Its export is removed, so a mesh found afterwards is this run's."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    shutil.rmtree(run_dir / "dmtet_mesh")
    return run_dir


# One run folder taken through every ending in turn: each process resumes (resume=auto) from the
# state the previous ending left, so each ending is also one resumed from, and the last resume must
# export exactly the straight run's mesh. Fault points count iterations across resumes.
# (name, F3D_TEST_FAULT, exit code, checkpoint iteration afterwards (None: none), mesh exported,
#  overrides)
ENDINGS = [
    # Stopped at once, before any checkpoint: resume=auto starts over. (SIGTERM takes this path
    # at the export below.)
    ("SIGINT during pretraining", "pretrain:10:SIGINT", 130, None, False, []),
    # Killed while last.pt's successor is half written: last.pt (2) stays intact, iterations 3
    # and 4 are logged after it; the next run drops them (and the stale .tmp).
    ("SIGKILL during a checkpoint write", "checkpoint:4:SIGKILL", -signal.SIGKILL, 2, False, []),
    # Killed between checkpoints, with iteration 3 logged after the checkpoint of 2 (the next
    # checkpoint moved to 5; checkpoints do not change the training).
    ("SIGKILL during training", "train:5:SIGKILL", -signal.SIGKILL, 2, False, ["save_interval=5"]),
    # The stop rides in the next step's all-reduce: the run stops, and checkpoints, one step later;
    # SIGTERM (a scheduler about to kill the job) skips the export.
    ("SIGTERM during training", "train:3:SIGTERM", 143, 4, False, []),
    # The checkpoint being written is finished first, then the run quits, unexported.
    ("second SIGINT while checkpointing", "train:5:SIGINT,checkpoint:6:SIGINT", 130, 6, False, []),
    # Ctrl-C once: stops a step later as SIGTERM does, but exports the mesh of that step.
    ("SIGINT during training", "train:7:SIGINT", 130, 8, True, []),
    # Stopped at once with every iteration checkpointed: the resumed run only exports. (SIGINT
    # takes this path during the pretraining above.)
    ("SIGTERM during the export", "export:1:SIGTERM", 143, 10, False, []),
]


@pytest.mark.slow
def test_every_ending_says_so_and_resumes_to_the_same_mesh(tmp_path: Path, tiny_sd_path: Path,
                                                          straight_run: Path) -> None:
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.pt"
    for case, fault, code, checkpoint_it, exported, overrides in ENDINGS:
        # TensorBoard's import costs each process seconds; it stays on (as in a user's run) for
        # the Ctrl-C that exports, the ending that still writes to it.
        board = "tensorboard=auto" if exported else "tensorboard=off"
        resume = [] if checkpoint_it is None else ["resume=auto"]   # the first run starts the folder
        proc = _train_process(run_dir, tiny_sd_path, fault, board, *resume, *overrides)
        assert proc.returncode == code, (case, proc.stderr[-3000:])
        assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
        status = _status(run_dir)
        assert not ckpt.with_name("last.pt.tmp").exists() or code == -signal.SIGKILL, case
        if checkpoint_it is None:
            assert not ckpt.exists(), case
        else:
            assert torch.load(ckpt, map_location="cpu", weights_only=False)["it"] == checkpoint_it, case
        assert (run_dir / "dmtet_mesh" / "mesh.obj").exists() == exported, case
        if code == -signal.SIGKILL:
            assert status["state"] == "running", case         # killed outright: nothing could say otherwise
            assert len(read_log(run_dir)) > checkpoint_it, case   # the log ran ahead of the checkpoint
        else:
            ending = [line for line in proc.stderr.splitlines() if line.startswith("stopped by")]
            assert len(ending) == 1 and "resume=auto" in ending[0], (case, proc.stderr[-3000:])
            assert proc.stderr.rstrip().endswith(ending[0]), case   # the last word of the run
            assert status["state"] == "interrupted" and status["exit_code"] == code, case
            assert status["signal"] == signal.Signals(code - 128).name and status["message"] == ending[0], case
            # Each iteration logged once, up to the checkpoint (the resume dropped what ran ahead).
            logged = read_log(run_dir) if (run_dir / "log.jsonl").exists() else []
            assert [r["it"] for r in logged] == list(range(1, (checkpoint_it or 0) + 1)), case
        if exported:
            shutil.rmtree(run_dir / "dmtet_mesh")                 # the later checks are of later runs

    assert run_train(TINY_CONFIG, f"sd_model={tiny_sd_path}", f"out_dir={run_dir}", *SHORT, "resume=auto") == 0
    assert [r["it"] for r in read_log(run_dir)] == list(range(1, ITERATIONS + 1))
    assert _status(run_dir)["state"] == "finished"
    vertices, faces = _mesh(run_dir)
    straight_vertices, straight_faces = _mesh(straight_run)
    assert np.array_equal(faces, straight_faces) and np.array_equal(vertices, straight_vertices)


# ------------------------------------------------------------------------------------------------
# Slow: out of GPU memory
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_out_of_memory_keeps_the_checkpoint_and_says_what_to_lower(tmp_path: Path, tiny_sd_path: Path,
                                                                   straight_run: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    step = GeometryPhase.step
    failing, saved = ITERATIONS + 3, ITERATIONS + 2        # the third step after the resume; the second

    def step_out_of_memory(self, it, cams, generator):
        if it == failing:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return step(self, it, cams, generator)

    monkeypatch.setattr(GeometryPhase, "step", step_out_of_memory)
    run_dir = _continued_from(straight_run, tmp_path)
    assert run_train(TINY_CONFIG, f"sd_model={tiny_sd_path}", f"out_dir={run_dir}", *SHORT, f"iter={CONTINUED}",
                     "resume=auto") == 3
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    for part in (f"out of GPU memory during training iteration {failing} (geometry_fine stage)", "batch 1",
                 "train_res [64, 64]", "dmtet_grid 32", "GPU memory in use", "emulate_gpus",
                 f"checkpoint of iteration {saved}", "resume=auto"):
        assert part in lines[0], (part, lines[0])
    ckpt = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert ckpt["it"] == saved and not (run_dir / "checkpoints" / "last.pt.tmp").exists()
    status = _status(run_dir)
    assert status["state"] == "failed" and status["exit_code"] == 3 and status["checkpoint_iteration"] == saved
    assert [r["it"] for r in read_log(run_dir)] == list(range(1, saved + 1))   # the failed step is not logged


# ------------------------------------------------------------------------------------------------
# Slow: one process of a torchrun group fails
# ------------------------------------------------------------------------------------------------


def _processes_with(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _torchrun(run_dir: Path, config: Path, tiny_sd: Path, fault: str) -> tuple[list[str], dict[str, str]]:
    """Two gloo processes continuing the straight run's checkpoint (written by one process: the
    ranks restart their random streams, a warning) from its iteration ITERATIONS."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", faults.ENV: fault}
    cmd = distributed.torchrun_command(2, ["train.py", "--config", str(config), f"sd_model={tiny_sd}",
                                           f"out_dir={run_dir}", *SHORT, "batch=1", f"iter={CONTINUED}",
                                           "resume=auto"])
    return cmd, env


def _resumed_or_failed(status: dict[str, Any], earlier_pid: int) -> bool:
    return status["pid"] != earlier_pid and (status["message"] == f"resumed at iteration {ITERATIONS}"
                                             or status["state"] == "failed")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
@pytest.mark.parametrize("action", ["error", "SIGKILL"])
def test_a_failing_rank_ends_the_whole_group_within_a_minute(action: str, tmp_path: Path, tiny_sd_path: Path,
                                                             straight_run: Path) -> None:
    run_dir = _continued_from(straight_run, tmp_path)
    config = tmp_path / "ddp.json"                          # a unique path: finds this run's processes
    config.write_text(TINY_CONFIG.read_text())
    # Rank 1 fails at the start of the group's first iteration.
    cmd, env = _torchrun(run_dir, config, tiny_sd_path, f"train:{ITERATIONS + 1}:{action}:1")
    earlier = _status(run_dir)["pid"]                       # the straight run's
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 400
        # Rank 0 marks the resume in status.json just before the group's first iteration (or,
        # should this loop look a moment too late, already the failure).
        while not _resumed_or_failed(_status(run_dir), earlier):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        failing_soon = time.monotonic()
        _, err = proc.communicate(timeout=90)
        took = time.monotonic() - failing_soon
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"{action} on rank 1: the group ended {took:.1f} s after the resume")
    assert took < 60, took
    assert proc.returncode != 0
    assert _processes_with(str(config)) == []               # no worker left behind
    if action == "error":                                     # the failing rank's own message
        assert f"error (rank 1 of 2): test fault at train {ITERATIONS + 1} on rank 1" in err, err[-4000:]
    else:                                                     # a killed rank has none; torchrun names it
        assert "Signal 9 (SIGKILL)" in err, err[-4000:]
    # Rank 0 tells why it stopped, in one line and in status.json, without a traceback of its own.
    assert "error (rank 0 of 2): " in err and "another process stopped or failed" in err, err[-4000:]
    worker_tracebacks = err.count("Traceback") - err.count("torch/distributed/run.py")
    assert worker_tracebacks <= 0, err[-4000:]                # torchrun's own summary is its business
    assert _status(run_dir)["state"] == "failed"


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step(tmp_path: Path, tiny_sd_path: Path,
                                                                   straight_run: Path) -> None:
    """SIGTERM reaching rank 1 alone (before the group's first iteration): the request rides in
    the step's all-reduce, so both ranks stop after the next iteration, and rank 0 checkpoints it
    and says so."""
    run_dir = _continued_from(straight_run, tmp_path)
    first, stop = ITERATIONS + 1, ITERATIONS + 2
    cmd, env = _torchrun(run_dir, TINY_CONFIG, tiny_sd_path, f"train:{first}:SIGTERM:1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode != 0
    # torchrun reports the first exit (143); it then sends SIGTERM to a rank still finishing, which
    # may end it after its own ending was written (its exit code shows -15 then).
    assert "exitcode  : 143" in proc.stderr, proc.stderr[-4000:]
    assert f"stopped by SIGTERM after iteration {stop} of {CONTINUED}" in proc.stderr, proc.stderr[-4000:]
    assert torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)["it"] == stop
    assert [r["it"] for r in read_log(run_dir)] == list(range(1, stop + 1))
    assert _status(run_dir)["state"] == "interrupted" and not (run_dir / "dmtet_mesh").exists()
