"""Batches for preference objectives: a chosen/rejected pair (or a KTO example) is one unit, never split.

The tokenized split holds one row per sequence with its role (``vocab.ROLE_*``): a pair is two
consecutive rows, chosen then rejected.  The batch plan orders *units*, so a micro-batch, a packed
row and (in the backends' row splitting) a piece always hold whole pairs.  A batch carries:

* ``roles``: the role of every token's sequence (0 on padding), so a backend finds the sequences,
  packed or not, in order: chosen, rejected, chosen, rejected, … (or, for KTO, example, KL row, …);
* ``ref_logps`` when the reference model's log-probs were precomputed: each token's log-prob
  under the reference, given the tokens before it (0 at a sequence's first token).

KTO estimates the reference point of its value function from mismatched pairs, as the paper and TRL
do: each example's prompt followed by the completion of the next example of the micro-batch (a KL
row, role ``ROLE_KL``), scored by the policy and the reference and never trained on directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tunelab.data.batching import Units, collate
from tunelab.data.packing import collate_packed
from tunelab.data.tokenize import TokenizedSplit
from tunelab.errors import DataError
from tunelab.vocab import IGNORE, ROLE_CHOSEN, ROLE_KL, ROLE_REJECTED

Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class _Seq:
    ids: np.ndarray
    labels: np.ndarray
    role: int
    ref: np.ndarray | None = None


def units_for(fmt: str, split: TokenizedSplit, pad_id: int, max_seq_len: int) -> Units | None:
    """The units a split of format ``fmt`` is batched in (None: plain examples)."""
    if fmt == "preference":
        return PairUnits(split, pad_id)
    if fmt == "kto":
        return KtoUnits(split, pad_id, max_seq_len)
    return None


class PairUnits:
    """Rows ``2k`` (chosen) and ``2k + 1`` (rejected) of the split are unit ``k``."""

    def __init__(self, split: TokenizedSplit, pad_id: int) -> None:
        roles = split.roles
        if roles is None or len(split) % 2 or (len(roles) and not _alternates(roles)):
            raise DataError("the tokenized preference data is not in chosen/rejected pairs; clear the cache")
        self.split = split
        self.pad_id = pad_id
        rows = split.lengths
        self._lengths = rows[0::2] + rows[1::2]

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths

    def collate(self, indices: np.ndarray) -> Batch:
        return _collate([seq for k in indices for seq in self._pair(int(k))], self.pad_id)

    def collate_packed(self, rows: Sequence[np.ndarray]) -> Batch:
        return _collate_packed([[seq for k in row for seq in self._pair(int(k))] for row in rows], self.pad_id)

    def _pair(self, k: int) -> list[_Seq]:
        return [_row(self.split, 2 * k), _row(self.split, 2 * k + 1)]


class KtoUnits:
    """Each example is a unit, batched with a KL row: its prompt and the next example's completion."""

    def __init__(self, split: TokenizedSplit, pad_id: int, max_seq_len: int) -> None:
        if split.roles is None:
            raise DataError("the tokenized KTO data has no labels; clear the cache")
        self.split = split
        self.pad_id = pad_id
        self.max_seq_len = max_seq_len

    @property
    def lengths(self) -> np.ndarray:
        return 2 * self.split.lengths  # the example and (about as long) its KL row

    def collate(self, indices: np.ndarray) -> Batch:
        units = self._units([int(i) for i in indices])
        return _collate([seq for unit in units for seq in unit], self.pad_id)

    def collate_packed(self, rows: Sequence[np.ndarray]) -> Batch:
        units = iter(self._units([int(i) for row in rows for i in row]))
        return _collate_packed([[seq for _ in row for seq in next(units)] for row in rows], self.pad_id)

    def _units(self, indices: list[int]) -> list[list[_Seq]]:
        """(example, KL row) per index: the KL row pairs the example's prompt with the next one's completion."""
        examples = [_row(self.split, i) for i in indices]
        out = []
        for at, example in enumerate(examples):
            other = examples[(at + 1) % len(examples)]
            cut, other_cut = _completion_start(example.labels), _completion_start(other.labels)
            ids = np.concatenate([example.ids[:cut], other.ids[other_cut:]])[: self.max_seq_len]
            labels = np.concatenate([np.full(cut, IGNORE, np.int32), other.labels[other_cut:]])[: self.max_seq_len]
            out.append([example, _Seq(ids, labels, ROLE_KL)])
        return out


def _alternates(roles: np.ndarray) -> bool:
    return bool((roles[0::2] == ROLE_CHOSEN).all() and (roles[1::2] == ROLE_REJECTED).all())


def _row(split: TokenizedSplit, i: int) -> _Seq:
    assert split.roles is not None
    ref = split.ref_logps[i] if split.ref_logps is not None else None
    return _Seq(np.asarray(split.input_ids[i]), np.asarray(split.labels[i]), int(split.roles[i]), ref)


def _completion_start(labels: np.ndarray) -> int:
    """Where the completion begins: the first position (after the first) that carries a label."""
    trained = np.flatnonzero(labels[1:] != IGNORE)
    return int(trained[0]) + 1 if len(trained) else len(labels)


def _collate(seqs: list[_Seq], pad_id: int) -> Batch:
    """One row per sequence, right-padded; ``roles`` (and ``ref_logps``) per token."""
    batch = collate(TokenizedSplit([s.ids for s in seqs], [s.labels for s in seqs]), np.arange(len(seqs)), pad_id)
    roles = np.asarray([s.role for s in seqs], dtype=np.int64)
    batch["roles"] = batch["attention_mask"] * roles[:, None]
    if seqs and all(s.ref is not None for s in seqs):
        ref = np.zeros(batch["input_ids"].shape, dtype=np.float32)
        for r, seq in enumerate(seqs):
            ref[r, : len(seq.ids)] = seq.ref  # type: ignore[assignment]
        batch["ref_logps"] = ref
    return batch


def _collate_packed(rows: list[list[_Seq]], pad_id: int) -> Batch:
    """Sequences of a row side by side (as packing lays examples out); ``roles`` and ``ref_logps`` per token."""
    flat = [seq for row in rows for seq in row]
    split = TokenizedSplit([s.ids for s in flat], [s.labels for s in flat])
    starts = np.cumsum([0] + [len(row) for row in rows])
    batch = collate_packed(split, [np.arange(starts[r], starts[r + 1]) for r in range(len(rows))], pad_id)
    roles = np.zeros(batch["input_ids"].shape, dtype=np.int64)
    ref = np.zeros(batch["input_ids"].shape, dtype=np.float32)
    for r, row in enumerate(rows):
        at = 0
        for seq in row:
            roles[r, at : at + len(seq.ids)] = seq.role
            if seq.ref is not None:
                ref[r, at : at + len(seq.ids)] = seq.ref
            at += len(seq.ids)
    batch["roles"] = roles
    if flat and all(s.ref is not None for s in flat):
        batch["ref_logps"] = ref
    return batch
