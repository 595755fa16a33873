"""Deterministic, resumable micro-batches.

The data order is a pure function of ``(seed, epoch)``, and the trainer's only
data state is one integer: how many micro-batches it has consumed.  That makes
resume exact: a restarted run recomputes the same order and skips ahead.

With packing (:mod:`tunelab.data.packing`) the plan orders packed rows instead
of examples; rows are packed once, so the cursor arithmetic is the same.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tunelab.data.lazy import LazyBatches
from tunelab.data.packing import collate_packed, pack_rows, row_lengths, token_efficiency
from tunelab.data.tokenize import TokenizedSplit
from tunelab.vocab import IGNORE

_GROUP_SPAN = 64  # batches per length-sorted group: little padding, order still random


@dataclass(frozen=True)
class BatchPlan:
    """How a split is cut into micro-batches for every epoch."""

    batch_size: int
    seed: int
    shuffle: bool
    group_by_length: bool

    def epoch_batches(self, lengths: np.ndarray, epoch: int) -> list[np.ndarray]:
        """Index arrays of the micro-batches of one epoch, in order."""
        n = len(lengths)
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        if self.group_by_length:
            span = self.batch_size * _GROUP_SPAN
            groups = [order[i : i + span] for i in range(0, n, span)]
            order = np.concatenate([g[np.argsort(-lengths[g], kind="stable")] for g in groups])
        batches = [order[i : i + self.batch_size] for i in range(0, n, self.batch_size)]
        if self.group_by_length and self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches


class Units(Protocol):
    """What a micro-batch is made of: single examples, or units of several sequences (a preference pair).

    The plan orders units; a unit is never split between micro-batches or packed rows.
    """

    @property
    def lengths(self) -> np.ndarray:
        """Tokens each unit holds."""
        ...

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """The padded batch of these units."""
        ...

    def collate_packed(self, rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """The packed batch of these rows of units."""
        ...


@dataclass(frozen=True)
class ExampleUnits:
    """Every example of the split is a unit of its own (SFT)."""

    split: TokenizedSplit
    pad_id: int

    @property
    def lengths(self) -> np.ndarray:
        return self.split.lengths

    def collate(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        return collate(self.split, indices, self.pad_id)

    def collate_packed(self, rows: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        return collate_packed(self.split, rows, self.pad_id)


class MicroBatchStream:
    """An endless stream of padded micro-batches, positioned by a single cursor.

    With ``pack_to`` every micro-batch holds ``plan.batch_size`` rows of examples
    packed up to ``pack_to`` tokens each, instead of that many single examples.
    ``units`` (default: each example) says what the plan orders.
    """

    def __init__(
        self,
        split: TokenizedSplit,
        plan: BatchPlan,
        pad_id: int,
        *,
        pack_to: int | None = None,
        units: Units | None = None,
    ) -> None:
        self.split = split
        self.plan = plan
        self.pad_id = pad_id
        self.units: Units = units if units is not None else ExampleUnits(split, pad_id)
        lengths = self.units.lengths
        self._rows = pack_rows(lengths, pack_to, seed=plan.seed, shuffle=plan.shuffle) if pack_to else None
        # What the plan orders: examples, or packed rows (by how many tokens they hold).
        self._lengths = row_lengths(lengths, self._rows) if self._rows is not None else lengths
        self._epoch = -1
        self._batches: list[np.ndarray] = []

    @property
    def packed(self) -> bool:
        return self._rows is not None

    @property
    def batches_per_epoch(self) -> int:
        return -(-len(self._lengths) // self.plan.batch_size)

    @property
    def token_efficiency(self) -> float:
        """Fraction of the token slots of an epoch's micro-batches that hold real tokens (not padding)."""
        return token_efficiency(self._lengths, self.plan.epoch_batches(self._lengths, 0))

    def get(self, cursor: int) -> dict[str, np.ndarray]:
        """The micro-batch at absolute position ``cursor`` (epoch = cursor // batches_per_epoch)."""
        epoch, index = divmod(cursor, self.batches_per_epoch)
        if epoch != self._epoch:
            self._batches = self.plan.epoch_batches(self._lengths, epoch)
            self._epoch = epoch
        if self._rows is None:
            return self.units.collate(self._batches[index])
        return self.units.collate_packed([self._rows[r] for r in self._batches[index]])

    def epoch_of(self, cursor: int) -> float:
        return cursor / self.batches_per_epoch


def collate(split: TokenizedSplit, indices: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad a set of examples to the longest; padding gets no loss and no attention."""
    width = max(len(split.input_ids[i]) for i in indices)
    ids = np.full((len(indices), width), pad_id, dtype=np.int64)
    labels = np.full((len(indices), width), IGNORE, dtype=np.int64)
    mask = np.zeros((len(indices), width), dtype=np.int64)
    for row, i in enumerate(indices):
        n = len(split.input_ids[i])
        ids[row, :n] = split.input_ids[i]
        labels[row, :n] = split.labels[i]
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def eval_batches(split: TokenizedSplit, batch_size: int, pad_id: int, units: Units | None = None) -> LazyBatches:
    """Every validation example (or unit) once, length-sorted so batches carry little padding."""
    units = units if units is not None else ExampleUnits(split, pad_id)
    order = np.argsort(-units.lengths, kind="stable")
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return LazyBatches(groups, units.collate)
