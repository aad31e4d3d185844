"""Where this process sits in a launch (rank, world size, device) and the few collectives the trainer needs.

Distributed state comes from the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``/``MASTER_PORT``) through :func:`init_distributed`; :func:`print0` prints on rank 0. In one process
every collective is the identity.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    """Where this process sits: global rank, rank on its node, number of processes, its device."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # True when init_distributed created the process group (and should destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world() -> tuple[int, int, int]:
    """``(rank, local_rank, world_size)`` from the launcher's environment (1 process when unset)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init_distributed(device: str = "auto", *, engine: str = "auto") -> DistInfo:
    """Join the process group the launcher described (if any) and pick this rank's device.

    ``device``: ``auto`` = ``cuda:LOCAL_RANK`` when CUDA is available, else CPU. Backend: nccl on GPU, gloo on
    CPU. DeepSpeed always gets a process group, even for one process (it needs one).
    """
    rank, local_rank, world = env_world()
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    need_group = world > 1 or engine == "deepspeed"
    owns = False
    if need_group and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world,
                                device_id=dev if use_cuda else None)
        # DeepSpeed caches groups derived from this one in module globals; destroying it would break a second
        # DeepSpeed run in the same process (tests, notebooks). It ends with the process instead.
        owns = engine != "deepspeed"
    return DistInfo(rank=rank, local_rank=local_rank, world_size=world, device=dev, owns_group=owns)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def print0(*args: Any, **kwargs: Any) -> None:
    """``print`` on rank 0 only (every rank runs the same code; one of them talks)."""
    if is_main_process():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (downloads, conversions, data caches), then the other ranks reuse its work."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small float tensor (identity in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    backend_device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    buf = values.detach().to(backend_device, torch.float64).clone()
    dist.all_reduce(buf)
    return (buf / dist.get_world_size()).to(values.device, values.dtype)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (a list of one in one process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def close_distributed(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
