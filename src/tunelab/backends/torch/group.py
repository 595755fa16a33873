"""The torch process group behind :class:`~tunelab.distributed.group.Group` (gloo on CPU, NCCL on CUDA)."""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


class TorchGroup:
    """A ``torch.distributed`` process group; CPU tensors go over gloo, CUDA ones over NCCL."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank = rank
        self.world = world

    def barrier(self) -> None:
        dist.barrier()

    def all_sum(self, values: Sequence[float]) -> list[float]:
        tensor = torch.tensor(list(values), dtype=torch.float64)
        dist.all_reduce(tensor)
        return [float(v) for v in tensor]

    def any(self, flag: bool) -> bool:
        return self.all_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast(self, obj: T) -> T:
        box: list[Any] = [obj]
        dist.broadcast_object_list(box, src=0, device=torch.device("cpu"))
        return box[0]


def join_torch() -> TorchGroup:
    """Join the process group torchrun described in the environment (set up once per process)."""
    if torch.cuda.is_available():
        # Each rank owns one GPU; a plain "cuda" device then means this one.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
        # The others wait in a barrier while rank 0 tokenizes a large dataset; a crashed
        # rank is caught by torchrun long before this, so the limit only has to be generous.
        dist.init_process_group(backend, timeout=timedelta(hours=2))
        atexit.register(_leave)
    return TorchGroup(dist.get_rank(), dist.get_world_size())


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
