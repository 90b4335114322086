"""Process-group setup and the few collectives training needs. The only module that knows ranks.

Works unchanged under `python train.py` (one process), `torchrun --nproc_per_node=N` on one host,
and multi-node torchrun rendezvous: the device comes from LOCAL_RANK, camera sectors and seeds
from RANK and WORLD_SIZE.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DeviceError(RuntimeError):
    pass


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
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def average_gradients(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """All-reduce (mean) every gradient in one flat bucket: one collective per optimizer step.

    Sync point: every rank must call this once per optimizer step, with the same parameter list,
    so all ranks step with identical gradients and keep identical parameters.
    """
    if not info.distributed:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        if p.grad is None:
            p.grad = flat[offset:offset + n].view_as(p).clone()
        else:
            p.grad.copy_(flat[offset:offset + n].view_as(p))
        offset += n


def any_flag(flag: bool, info: DistInfo) -> bool:
    """True when any rank raised the flag. Sync point: all ranks call it at the same place."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_floats(values: list[float], info: DistInfo) -> list[list[float]]:
    """Every rank's small list of floats (same length on each rank), in rank order.

    Sync point: collective; all ranks call it at the same place.
    """
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    if not info.distributed:
        return [t.tolist()]
    out = [torch.empty_like(t) for _ in range(info.world_size)]
    dist.all_gather(out, t)
    return [o.tolist() for o in out]


def gather_objects(obj: object, info: DistInfo) -> list[object]:
    """Every rank's picklable object, in rank order (used for RNG states at checkpoint time)."""
    if not info.distributed:
        return [obj]
    out: list[object] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_params(params: list[torch.nn.Parameter], info: DistInfo) -> None:
    """Rank 0's parameters to all ranks (after init or resume). Sync point: collective."""
    if not info.distributed:
        return
    for p in params:
        dist.broadcast(p.data, src=0)
