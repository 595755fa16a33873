"""The processes of one run and the few collectives the trainer needs.

torchrun (and ``tunelab train --nproc``) describe a process by environment
variables: ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``.
:func:`join` turns them into a :class:`Group`; a process started any other way
gets :data:`SOLO`, whose collectives cost nothing, so single-process runs take
exactly the path they always did.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class Group(Protocol):
    """The collectives a data-parallel run needs (every rank must call them in the same order)."""

    rank: int
    world: int

    def barrier(self) -> None:
        """Wait until every rank gets here."""
        ...

    def all_sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums of ``values`` over all ranks."""
        ...

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on at least one."""
        ...

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (a picklable object)."""
        ...


class SoloGroup:
    """One process: every collective is the identity."""

    rank = 0
    world = 1

    def barrier(self) -> None:
        pass

    def all_sum(self, values: Sequence[float]) -> list[float]:
        return list(values)

    def any(self, flag: bool) -> bool:
        return flag

    def broadcast(self, obj: T) -> T:
        return obj


SOLO = SoloGroup()


_joined: list[Group] = []  # filled on the first join(): the process group lives as long as the process


def rank_from_env() -> int:
    """This process's rank as torchrun or mlx.launch set it (0 when started by neither)."""
    return int(os.environ.get("RANK", os.environ.get("MLX_RANK", "0")))


def world_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_mlx() -> bool:
    """True in a process ``mlx.launch`` started (it sets ``MLX_RANK``; torchrun sets ``WORLD_SIZE``)."""
    return "MLX_RANK" in os.environ and "WORLD_SIZE" not in os.environ


def join() -> Group:
    """The group this process belongs to, set up on first use (:data:`SOLO` when started alone)."""
    if _joined:
        return _joined[0]
    if launched_by_mlx():
        from tunelab.backends.mlx.group import MlxGroup

        mlx_group = MlxGroup()
        if mlx_group.world > 1:
            _joined.append(mlx_group)
        return _joined[0] if _joined else SOLO
    if world_from_env() <= 1:
        return SOLO
    from tunelab.backends.torch.group import join_torch

    group = join_torch()
    _joined.append(group)
    return group


@contextmanager
def main_first(group: Group) -> Iterator[None]:
    """Rank 0 runs the block first (e.g. to fill a cache), the others after it is done."""
    if group.rank != 0:
        group.barrier()
    yield
    if group.rank == 0:
        group.barrier()


def shared(group: Group, make: Any) -> Any:
    """``make()`` run on rank 0 only, its result (or its error) handed to every rank.

    A user error on rank 0 (an output_dir in use, an unknown run id) then stops
    every rank with the same message, instead of leaving them waiting.
    """
    from tunelab.errors import StateError, TunelabError

    if group.world == 1:
        return make()
    result: Any = None
    error: BaseException | None = None
    if group.rank == 0:
        try:
            result = make()
        except BaseException as exc:  # re-raised below, after the others have heard of it
            error = exc
    message = None if error is None else (error.message if isinstance(error, TunelabError) else repr(error))
    result, message = group.broadcast((result, message))
    if error is not None:
        raise error
    if message is not None:
        raise StateError(f"rank 0 failed: {message}")
    return result
