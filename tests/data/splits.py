"""Tokenized splits built on the spot, shared by the batching and packing tests."""

from __future__ import annotations

import numpy as np

from tunelab.data.tokenize import TokenizedSplit
from tunelab.vocab import IGNORE

PAD = 0


def make_split(lengths: list[int] | np.ndarray, *, seed: int = 0) -> TokenizedSplit:
    """Examples whose ids are distinct and non-zero (so padding is recognisable); first token unlabelled."""
    rng = np.random.default_rng(seed)
    split = TokenizedSplit()
    for n in lengths:
        ids = rng.integers(1, 1000, size=int(n)).astype(np.int32)
        labels = ids.copy()
        labels[0] = IGNORE
        split.input_ids.append(ids)
        split.labels.append(labels)
    return split
