"""The shapes of training batches on the torch path: padding for the compiled layers, and when a mask is needed.

Compiled decoder layers run fastest on a few fixed lengths, so batches are
right-padded to a multiple of :data:`fast.SHAPE_MULTIPLE` (or further, to the
longest row's length); and a right-padded batch needs no attention mask at all
under causal attention.  Both leave every scored token's loss unchanged.
"""

from __future__ import annotations

import numpy as np

from tunelab.backends.base import Batch, ModelSpec
from tunelab.backends.torch.fast import round_up
from tunelab.vocab import IGNORE


def widest_row(model: ModelSpec) -> int | None:
    """The padded length of the longest training row, where batches are padded (packed rows all have the
    pack length already)."""
    if model.packing or model.longest_row is None:
        return None
    return round_up(model.longest_row)


def compiled_width(width: int, widest: int | None) -> int:
    """The length a batch of ``width`` columns is padded to for the compiled layers.

    Up to the widest row's padded length where that adds at most a third of the columns, else
    the next multiple. The layers compile for the first length they see and, at a second, again
    for any length; that second compile took ~35 s on an 8B-shaped DPO run (rows of 512 and
    640), and the any-length graph's steps ran ~10% slower than the fixed one's (0.386 vs
    0.341 s). A batch of the common near-longest lengths thus pays a few padded columns
    instead; only much shorter batches bring a second length.
    """
    own = round_up(width)
    if widest is not None and own <= widest and 4 * own >= 3 * widest:
        return widest
    return own


def right_padded(mask: np.ndarray) -> bool:
    """Whether every row of ``mask`` is ones then zeros (no left padding, no holes)."""
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


def pad_to_multiple(batch: Batch, width: int | None = None) -> Batch:
    """Right-pad a batch's length to ``width`` (default: the next multiple of :data:`fast.SHAPE_MULTIPLE`),
    so the compiled layers see few shapes.

    The added columns carry no loss and are masked out (or, packed, form a
    sequence of their own), so the loss is unchanged.
    """
    length = batch["input_ids"].shape[1]
    extra = (width if width is not None else round_up(length)) - length
    if extra == 0:
        return batch
    out = {}
    for key, value in batch.items():
        if key == "labels":
            fill = np.full((value.shape[0], extra), IGNORE, dtype=value.dtype)
        elif key == "position_ids":  # restarting at 0: a sequence of its own, which nothing real attends to
            fill = np.broadcast_to(np.arange(extra, dtype=value.dtype), (value.shape[0], extra))
        else:  # input_ids (any id), attention_mask and segment_ids: 0
            fill = np.zeros((value.shape[0], extra), dtype=value.dtype)
        out[key] = np.concatenate([value, fill], axis=1)
    return out
