"""TPGroup: the tensor-parallel process group a worker rank belongs to.

A thin wrapper over torch.distributed's default group that also covers size 1 (no process
group: every collective is a no-op), so one code path serves TP=1 baselines and TP=N runs;
`from_env` joins the group (collectives of a size > 1 group need it). Backend: gloo
on CPU (tests), NCCL on GPUs. Rank r drives cuda:r and talks to the daemon of that GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int
    size: int

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size: {self.size} must be >= 1")
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank: {self.rank} must be in [0, size={self.size})")

    @staticmethod
    def single() -> TPGroup:
        return TPGroup(0, 1)

    @staticmethod
    def from_env(backend: str | None = None, timeout_s: float = 300.0) -> TPGroup:
        """Join the group torchrun-style: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the
        environment; WORLD_SIZE 1 (or unset) gives a single rank without a process group."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        if size == 1:
            return TPGroup.single()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        device = None
        if backend == "nccl":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group(
                backend, rank=rank, world_size=size, timeout=timedelta(seconds=timeout_s), device_id=device
            )
        return TPGroup(dist.get_rank(), dist.get_world_size())

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's equal share of `total` items (`what` names them in errors)."""
        if total % self.size:
            raise ValueError(f"{what}: {total} is not divisible by the tensor-parallel size {self.size}")
        part = total // self.size
        return self.rank * part, (self.rank + 1) * part

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks in place (row-parallel layers); returns it."""
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """[size, *tensor.shape]: every rank's tensor, in rank order, on every rank."""
        if self.size == 1:
            return tensor.unsqueeze(0)
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts)

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    def close(self) -> None:
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()
