"""Helpers shared by the backend tests."""

from __future__ import annotations

import numpy as np


def random_batch() -> dict[str, np.ndarray]:
    """Two rows of 24 random tokens, every position supervised (the same batch on every call)."""
    ids = np.random.default_rng(0).integers(3, 300, (2, 24)).astype(np.int64)
    return {"input_ids": ids, "labels": ids.copy(), "attention_mask": np.ones_like(ids)}
