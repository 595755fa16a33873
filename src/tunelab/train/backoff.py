"""Out-of-memory back-off: a step that runs out of memory is retried on smaller pieces, never lost.

Each global micro-batch runs as ``parts`` pieces of its rows.  When a step runs out of memory (CUDA,
MPS, Metal or a failed CPU allocation, as the backend tells), its partial gradients are dropped,
``parts`` doubles — half the micro-batch, twice the accumulation — and the same step runs again
on the same rows.  The loss is scaled by the step's supervised-token count whatever the pieces, so
the gradient is the one the whole micro-batch gives (same effective batch, same data order): the run
goes on as an uninterrupted run with the smaller micro-batch would.  Only when a piece of one row
fails does the run stop, with :class:`OutOfMemoryError` naming what to change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import SupportsFloat

import numpy as np

from tunelab.backends.base import Backend, Batch
from tunelab.backends.preference import add_stats
from tunelab.distributed.sharding import DataParallel
from tunelab.errors import StateError

Stats = dict[str, tuple[float, float]]
HINTS = (
    "train.gradient_checkpointing: true",
    "train.offload_checkpoints: true (CUDA)",
    "method: qlora",
    "a smaller data.max_seq_len",
)


def memory_hints(*, checkpointing: bool, offload: bool | str, method: str) -> tuple[str, ...]:
    """What to change after an out-of-memory stop: only the savings this run has not turned on already.

    (A run that already checkpoints, offloads and trains QLoRA is told the one thing left: shorter rows.)
    """
    already = (checkpointing, checkpointing and offload is not False, method == "qlora", False)
    return tuple(hint for hint, on in zip(HINTS, already, strict=True) if not on)


class OutOfMemoryError(StateError):
    """Even one row per piece does not fit: the run stops (its last completed step is checkpointed)."""


@dataclass(frozen=True)
class Backoff:
    """One back-off, as recorded on the run."""

    step: int  # the step that ran out of memory (and was then retried)
    micro_batch_size: int  # rows per piece from now on
    grad_accum: int  # pieces per optimizer step from now on
    reason: str  # the backend's out-of-memory message, first line


def split_rows(batch: Batch, parts: int) -> list[Batch]:
    """``batch`` as up to ``parts`` consecutive row groups, each trimmed of the padding columns it doesn't need."""
    rows = batch["input_ids"].shape[0]
    # Unpacked preference batches hold each pair (or KTO example and its KL row) as two rows: kept together.
    unit = 2 if "roles" in batch and "segment_ids" not in batch else 1
    if parts <= 1 or rows <= unit:
        return [batch]
    pieces = []
    for idx in np.array_split(np.arange(rows // unit), min(parts, rows // unit)):
        piece = {k: v[idx[0] * unit : (idx[-1] + 1) * unit] for k, v in batch.items()}
        mask = piece["attention_mask"]
        width = int(np.flatnonzero(mask.any(axis=0))[-1]) + 1 if mask.any() else mask.shape[1]
        pieces.append({k: v[:, :width] for k, v in piece.items()})
    return pieces


def accumulate(
    backend: Backend, micro: Sequence[Batch], parallel: DataParallel, parts: int, supervised: int
) -> tuple[list[SupportsFloat], Stats]:
    """Forward and backward of one step's micro-batches (this rank's rows, in ``parts`` pieces each).

    Returns each piece's summed loss, unread (``float()`` of each waits for the device, so the
    caller reads them once the step's work is queued), and the objective's summed diagnostics
    (``(sum, count)`` by name).
    """
    losses: list[SupportsFloat] = []
    stats = Stats()
    for batch in micro:
        for local in parallel.local(batch):
            for piece in split_rows(local, parts):
                part = backend.forward_backward(piece, 1.0 / max(supervised, 1))
                losses.append(part.loss_sum)
                add_stats(stats, part.stats)
    return losses, stats


def accumulate_with_backoff(
    backend: Backend,
    micro: Sequence[Batch],
    parallel: DataParallel,
    parts: int,
    supervised: int,
    *,
    step: int,
    on_backoff: Callable[[Backoff], None],
    hints: Sequence[str] = HINTS,
) -> tuple[list[SupportsFloat], Stats, int]:
    """:func:`accumulate`, halving the pieces on out-of-memory to one row each; returns (losses, stats, parts)."""
    while True:
        try:
            return *accumulate(backend, micro, parallel, parts, supervised), parts
        except Exception as exc:
            if not backend.is_out_of_memory(exc):
                raise
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        # Out of the except block, the exception and the frames it holds (the failed step's tensors) are gone.
        backend.release_memory()
        rows = max(b["input_ids"].shape[0] for b in micro) // max(parallel.group.world, 1)
        if -(-rows // parts) <= 1 or parallel.group.world > 1:
            raise _stop(step, rows, parts, parallel.group.world, reason, hints)
        parts *= 2
        on_backoff(Backoff(step + 1, -(-rows // parts), len(micro) * parts, reason))


def _stop(step: int, rows: int, parts: int, world: int, reason: str, hints: Sequence[str]) -> OutOfMemoryError:
    where = f"step {step + 1} ran out of memory ({reason})"
    if world > 1:
        return OutOfMemoryError(
            f"{where} on one of {world} processes; back-off is for one process only",
            hint="resume with a smaller train.batch_size, or " + ", ".join(hints),
        )
    return OutOfMemoryError(
        f"{where} even with {-(-rows // parts)} row per micro-batch; the last completed step is checkpointed",
        hint="use " + ", or ".join(hints) + ", then resume with `tunelab train --resume RUN_ID`",
    )
