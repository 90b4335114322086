"""Process-group setup and the few collectives training needs. The only module that knows ranks.

Works unchanged under `python train.py` (one process), `torchrun --nproc_per_node=N` on one host,
and multi-node torchrun rendezvous: the device comes from LOCAL_RANK, camera sectors and seeds
from RANK and WORLD_SIZE.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

# How long a collective waits for the other processes. Not short: ranks legitimately wait for
# each other at startup (the first run downloads the diffusion model while the others wait at
# the first collective) and at the end (rank 0 exports alone before the final barrier). A process
# that dies or fails is noticed long before this: its sockets close, so the others' next
# collective fails at once (gloo), and torchrun, which checks its workers every 0.1 s, sends the
# rest SIGTERM and SIGKILLs them 30 s later (TORCH_ELASTIC_SHUTDOWN_TIMEOUT).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)


class DeviceError(RuntimeError):
    pass


class PeerFailure(RuntimeError):
    """A collective failed because another process stopped or failed (its own message says why)."""


@contextlib.contextmanager
def _collective(what: str) -> Iterator[None]:
    """Turn a collective's failure (a peer's closed connection, a timeout) into PeerFailure."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except RuntimeError as e:        # DistBackendError and gloo's errors are RuntimeErrors
        raise PeerFailure(f"{what} failed, so another process stopped or failed (its message says why; "
                          f"here: {_short(e)})") from e


def _short(e: BaseException) -> str:
    """The gist of a backend error: '[.../pair.cc:553] Connection closed by peer [ip]:port. This is
    typically ...' -> 'Connection closed by peer [ip]:port'."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", (str(e).strip().splitlines() or [""])[0])
    return (text.split(". ")[0] or type(e).__name__)[:200]


def report_failure(message: str) -> None:
    """Under torchrun, record this process's failure where torchrun reads it, so the summary it
    prints when a worker fails names the cause instead of pointing at the elastic docs."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    with contextlib.suppress(OSError):
        with open(path, "w") as f:
            json.dump({"message": message, "timestamp": int(time.time())}, f)


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return default if value is None or value == "" else int(value)


def pick_device(requested: str, local_rank: int) -> torch.device:
    """`auto` = this process's GPU when CUDA is available, else CPU; `cuda` without a GPU is an error."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("device=cuda was requested but no CUDA device is available "
                          "(torch.cuda.is_available() is False); use device=cpu or device=auto")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(f"LOCAL_RANK {local_rank} has no GPU: this host has {count}; "
                          f"start at most {count} processes per node (--nproc_per_node)")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def setup(requested_device: str = "auto") -> DistInfo:
    """Join the process group when started by torchrun (WORLD_SIZE > 1); NCCL on CUDA, gloo on CPU."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device = pick_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        with _collective("joining the process group"):
            dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None,
                                    timeout=COLLECTIVE_TIMEOUT)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        # After a peer failed the group may be unusable; the run's own message is already out.
        with contextlib.suppress(RuntimeError):
            dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        with _collective("waiting for the other processes"):
            dist.barrier()


def step_all_reduce(params: list[torch.nn.Parameter], flags: list[bool], values: list[float],
                    info: DistInfo) -> torch.Tensor:
    """The optimizer step's one collective: every gradient averaged over ranks, each of ``flags``
    summed over ranks, and every rank's ``values`` (same length on each rank) gathered.

    Sync point: every rank calls this once per optimizer step with the same parameter list, so all
    ranks step with identical gradients and keep identical parameters. The flags and values ride
    in the gradient bucket (each rank writes its values into its own slot of a zero block; SUM then
    gathers them), so a step costs one all-reduce, not one per flag.

    Returns the reduced tail [len(flags) + world * len(values)] WITHOUT reading it: on CUDA it stays
    on the device, so the host does not wait for the step; read it later (the trainer does one step
    later) and split it with ``split_tail``. One process: no collective, the local tail on the CPU.
    """
    if not info.distributed:
        return torch.tensor([1.0 if f else 0.0 for f in flags] + [float(v) for v in values], dtype=torch.float64)
    world, n_val = info.world_size, len(values)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # The tail travels in the gradients' dtype (fp32): flags are 0/1, and the values (azimuths for
    # the log) keep ~1e-5 relative precision. Pinned + non-blocking: the copy does not stall.
    dtype = grads[0].dtype if grads else torch.float32
    start = len(flags) + info.rank * n_val
    tail = torch.zeros(len(flags) + world * n_val, dtype=dtype)
    tail[:len(flags)] = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=dtype)
    tail[start:start + n_val] = torch.tensor(values, dtype=dtype)
    tail_dev = (tail.pin_memory().to(info.device, non_blocking=True) if info.device.type == "cuda"
                else tail.to(info.device))
    flat = torch.cat([g.reshape(-1) for g in grads] + [tail_dev])
    with _collective("the step's gradient all-reduce"):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    n_grad = flat.numel() - tail.numel()
    flat[:n_grad] /= world
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset:offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n
    return flat[n_grad:].clone()   # a copy: the gradient bucket is not kept alive for the log


def split_tail(tail: list[float], n_flags: int, world_size: int) -> tuple[list[bool], list[list[float]]]:
    """``step_all_reduce``'s tail, read on the host -> (flags OR-ed over ranks, values per rank)."""
    n_val = (len(tail) - n_flags) // world_size
    flags = [v > 0 for v in tail[:n_flags]]
    return flags, [tail[n_flags + r * n_val:n_flags + (r + 1) * n_val] for r in range(world_size)]


def gather_floats(values: list[float], info: DistInfo) -> list[list[float]]:
    """Every rank's small list of floats (same length on each rank), in rank order.

    Sync point: collective; all ranks call it at the same place.
    """
    if not info.distributed:
        return [[float(v) for v in values]]
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    with _collective("gathering parameter checksums"):
        dist.all_gather(out, t)
    return [o.tolist() for o in out]


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's picklable object, in rank order (used for RNG states at checkpoint time)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    with _collective("gathering random states for the checkpoint"):
        dist.all_gather_object(out, obj)
    return out


def broadcast_params(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Rank 0's parameters to all ranks (after init or resume). Sync point: collective."""
    if not info.distributed:
        return
    with _collective("sharing rank 0's parameters"):
        for p in params:
            dist.broadcast(p.data, src=0)


def free_port() -> int:
    """A TCP port free on this host now, for a local process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`torchrun --nproc_per_node=nproc argv...` on this host (a free rendezvous port), run with this
    Python: how tools and tests start several training processes on one machine."""
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", *argv]

