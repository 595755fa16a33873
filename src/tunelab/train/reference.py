"""``objective.precompute_ref``: the reference model's log-probs, computed once before training.

Every sequence of both splits is scored by the reference (the base: adapters off, or a whole model
before its first step) in length-sorted batches; each row keeps its tokens' log-probs
(``TokenizedSplit.ref_logps``), which the batches then carry, so no step runs a reference forward
and full fine-tuning keeps no frozen copy of the model.
"""

from __future__ import annotations

import numpy as np

from tunelab.backends.base import Backend
from tunelab.data.batching import collate
from tunelab.data.tokenize import TokenizedSplit


def precompute_reference(backend: Backend, split: TokenizedSplit, batch_rows: int, pad_id: int) -> None:
    """Set ``split.ref_logps``: each row's per-token reference log-probs (float32, as long as the row)."""
    lengths = split.lengths
    order = np.argsort(-lengths, kind="stable")
    scored: list[np.ndarray] = [np.zeros(0, np.float32)] * len(split)
    for start in range(0, len(order), batch_rows):
        rows = order[start : start + batch_rows]
        out = backend.reference_logprobs(collate(split, rows, pad_id))
        for at, row in enumerate(rows):
            scored[row] = out[at, : lengths[row]].astype(np.float32)
    split.ref_logps = scored
