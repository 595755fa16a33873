"""Data parallelism: which rows of every global micro-batch this process trains on.

The data order is the single-process one over *global* micro-batches of
``global_rows`` rows (``batch_size × processes`` when the run started).  Rank
``r`` of ``N`` takes rows ``r::N`` of each, in pieces of at most ``batch_size``
rows.  The loss is normalised by the global count of supervised tokens and the
gradients are summed over ranks, so the update is the one a single process
would make on the whole global batch; and because ``global_rows`` is kept in
the checkpoint, a run started on 2 processes resumes on 1 (or 4) with the same
batches: one process then runs each global batch as two pieces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from tunelab.backends.base import Batch
from tunelab.distributed.group import SOLO, Group
from tunelab.errors import ConfigError
from tunelab.vocab import IGNORE


@dataclass(frozen=True)
class DataParallel:
    """How this rank takes its share of a global micro-batch."""

    group: Group = field(default=SOLO)
    rows: int = 0  # most rows per forward on this process (the micro-batch size); 0 = no limit
    # FSDP: every forward and backward is a collective (weights are gathered, gradients
    # reduce-scattered), so every rank must run as many as the others: one with fewer
    # pieces runs extra ones that carry no loss.
    even: bool = False

    def local(self, batch: Batch) -> list[Batch]:
        """This rank's rows of ``batch``, in pieces of at most ``rows`` rows (empty if it gets none)."""
        count = len(batch["input_ids"])
        if self.group.world == 1 and (self.rows == 0 or count <= self.rows):
            return [batch]  # the single-process path, untouched
        mine = np.arange(self.group.rank, count, self.group.world)
        step = self.rows or max(len(mine), 1)
        pieces = [_trim({k: v[mine[i : i + step]] for k, v in batch.items()}) for i in range(0, len(mine), step)]
        if not self.even:
            return pieces
        most = max(-(-len(range(r, count, self.group.world)) // step) for r in range(self.group.world))
        return pieces + [_no_loss(batch)] * (max(most, 1) - len(pieces))

    def shard_of(self, count: int) -> range:
        """Indices ``rank::world`` of ``count`` items (validation batches are split this way)."""
        return range(self.group.rank, count, self.group.world)

    def share(self, batches: Sequence[Batch]) -> list[Batch]:
        """This rank's validation batches (``rank::world``); with ``even``, as many on every rank."""
        mine = [batches[i] for i in self.shard_of(len(batches))]
        if not self.even or not batches:
            return mine
        most = -(-len(batches) // self.group.world)
        return mine + [_no_loss(batches[0])] * (most - len(mine))


def _no_loss(batch: Batch) -> Batch:
    """A one-row, one-column piece of ``batch`` whose label is ignored: a forward that adds nothing."""
    piece = {k: np.ascontiguousarray(v[:1, :1]) for k, v in batch.items()}
    piece["labels"] = np.full_like(piece["labels"], IGNORE)
    return piece


def _trim(batch: Batch) -> Batch:
    """Drop the trailing columns that are padding in every row of this piece.

    Batches are right-padded to the longest row of the *global* batch; a causal
    model's outputs at real positions do not depend on later columns, so
    cutting them changes no loss, only saves compute.
    """
    used = batch["attention_mask"].any(axis=0)
    width = int(np.flatnonzero(used)[-1]) + 1 if used.any() else 1
    return {k: np.ascontiguousarray(v[:, :width]) for k, v in batch.items()}


def check_parallel(parallel: str, backend: str, world: int, *, mlx_launch: bool = False) -> None:
    """Refuse what several processes can't do yet, saying what to set instead.

    torchrun's processes train on torch; ``mlx.launch``'s on MLX (its ring or MPI backend).
    """
    if world <= 1:
        return
    wanted = "mlx" if mlx_launch else "torch"
    if backend != wanted:
        launcher = "mlx.launch" if mlx_launch else "torchrun"
        raise ConfigError(
            f"processes started by {launcher} train on the {wanted} backend; this run uses {backend}",
            hint=f"set backend: {wanted} (tunelab train --nproc picks the launcher from the config's backend)",
        )
    if parallel == "fsdp" and mlx_launch:
        raise ConfigError(
            "train.parallel: fsdp shards the model with torch's FSDP2; MLX runs data parallel only",
            hint="set train.parallel: ddp (or auto), or backend: torch with torchrun",
        )
