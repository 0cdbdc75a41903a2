"""Data-parallel set-up from the ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

NCCL on GPUs, gloo on CPUs. Without the torchrun variables (or with WORLD_SIZE=1) training runs
in one process and nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | torch.device | None = None, backend: str | None = None) -> DistEnv:
    """Read the torchrun variables and initialise the default process group when WORLD_SIZE > 1.

    ``device``: ``None`` picks ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU.
    ``backend``: ``None`` picks NCCL for CUDA devices and gloo otherwise.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if device.index >= count:
            raise RuntimeError(f"device {device} does not exist: this process (LOCAL_RANK={local_rank}) sees "
                               f"{count} CUDA device(s); start at most {count} processes per node, or train on "
                               f"the CPU (device='cpu')")
        torch.cuda.set_device(device)
    env = DistEnv(rank, world_size, local_rank, device)
    if world_size > 1:
        if dist.is_initialized():
            env.rank, env.world_size = dist.get_rank(), dist.get_world_size()
        else:
            backend = backend or ("nccl" if device.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend, init_method="env://")
            env.initialized_here = True
    return env


def cleanup(env: DistEnv) -> None:
    if env.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
        env.initialized_here = False


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor
