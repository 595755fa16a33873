"""Packing: several examples per row, each still seeing only itself.

Examples are bin-packed into rows of at most ``capacity`` tokens by
first-fit-decreasing inside shuffled windows (a window bounds the work, and
shuffling first keeps file order from deciding which examples share a row).
Rows are packed once per run, as a pure function of the seed; the batch plan
then orders *rows* per ``(seed, epoch)``, exactly as it orders examples when
packing is off, so the trainer's single data cursor still resumes exactly.

A packed batch tells backends where each example starts, so attention and
positions stay per example:

* ``position_ids`` restart at 0 for every example (and for the padding tail);
* ``segment_ids`` number the examples of a row 1, 2, … (0 = padding);
* the first label of every example is ``IGNORE``.  With the shifted loss, the
  label at an example's first token is what the *previous* example's last token
  would learn to predict; an unpacked batch never trains that position either
  (a row's first label has no predecessor), so the loss is unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tunelab.data.lazy import LazyBatches
from tunelab.data.tokenize import TokenizedSplit
from tunelab.vocab import IGNORE

_WINDOW = 8192  # examples packed together; larger packs tighter, and costs O(window x rows)
_PACK_STREAM = 2**32 - 1  # RNG stream for packing, apart from the per-epoch streams 0, 1, 2, …


def pack_rows(lengths: np.ndarray, capacity: int, *, seed: int, shuffle: bool) -> list[np.ndarray]:
    """Group example indices into rows holding at most ``capacity`` tokens (an example never splits)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    capacity = max(int(capacity), int(lengths.max(initial=0)))
    n = len(lengths)
    order = np.random.default_rng([seed, _PACK_STREAM]).permutation(n) if shuffle else np.arange(n)
    rows: list[np.ndarray] = []
    for start in range(0, n, _WINDOW):
        window = order[start : start + _WINDOW]
        rows.extend(_first_fit_decreasing(window, lengths, capacity))
    return rows


def _first_fit_decreasing(items: np.ndarray, lengths: np.ndarray, capacity: int) -> list[np.ndarray]:
    """Longest first, each into the first row with room: rows end up nearly full."""
    items = items[np.argsort(-lengths[items], kind="stable")]
    free = np.empty(len(items), dtype=np.int64)
    members: list[list[int]] = []
    for item in items.tolist():
        size = lengths[item]
        fits = free[: len(members)] >= size
        row = int(fits.argmax()) if len(members) and fits.any() else len(members)
        if row == len(members):
            members.append([])
            free[row] = capacity
        members[row].append(item)
        free[row] -= size
    return [np.asarray(m, dtype=np.int64) for m in members]


def row_lengths(lengths: np.ndarray, rows: Sequence[np.ndarray]) -> np.ndarray:
    """Tokens held by each row."""
    return np.fromiter((int(lengths[r].sum()) for r in rows), dtype=np.int64, count=len(rows))


def collate_packed(split: TokenizedSplit, rows: Sequence[np.ndarray], pad_id: int) -> dict[str, np.ndarray]:
    """Lay out rows of examples side by side, right-padded to the fullest row."""
    sizes = [[len(split.input_ids[i]) for i in row] for row in rows]
    width = max(sum(s) for s in sizes)
    shape = (len(rows), width)
    ids = np.full(shape, pad_id, dtype=np.int64)
    labels = np.full(shape, IGNORE, dtype=np.int64)
    mask = np.zeros(shape, dtype=np.int64)
    positions = np.zeros(shape, dtype=np.int64)
    segments = np.zeros(shape, dtype=np.int64)
    for r, (row, row_sizes) in enumerate(zip(rows, sizes, strict=True)):
        at = 0
        for k, (i, n) in enumerate(zip(row, row_sizes, strict=True), start=1):
            ids[r, at : at + n] = split.input_ids[i]
            labels[r, at : at + n] = split.labels[i]
            labels[r, at] = IGNORE  # no learning across the boundary (see the module docstring)
            positions[r, at : at + n] = np.arange(n)
            segments[r, at : at + n] = k
            at += n
        mask[r, :at] = 1
        positions[r, at:] = np.arange(width - at)  # the padding tail is a sequence of its own
    return {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": positions,
        "segment_ids": segments,
    }


def packed_eval_batches(
    split: TokenizedSplit, batch_size: int, capacity: int, pad_id: int, units: Any = None
) -> LazyBatches:
    """Every validation example once, packed (file order, no shuffling), fullest rows first.

    ``units`` (a :class:`tunelab.data.batching.Units`; default: each example) says what is packed whole.
    """
    lengths = split.lengths if units is None else units.lengths
    rows = pack_rows(lengths, capacity, seed=0, shuffle=False)
    order = np.argsort(-row_lengths(lengths, rows), kind="stable")
    ordered = [rows[i] for i in order]
    groups = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
    if units is not None:
        return LazyBatches(groups, units.collate_packed)
    return LazyBatches(groups, lambda rows_of_batch: collate_packed(split, rows_of_batch, pad_id))


def token_efficiency(lengths: np.ndarray, batches: Sequence[np.ndarray]) -> float:
    """Real tokens over the token slots that batches of items of these lengths occupy once padded."""
    used = sum(int(lengths[b].sum()) for b in batches)
    slots = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return used / max(slots, 1)
