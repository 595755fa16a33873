"""Estimates: a config's predicted peak memory, line by line, and whether it fits the device."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tunelab.config.schema import RunConfig

if TYPE_CHECKING:
    from tunelab.memory.plan import MemoryPlan


def estimate_memory(
    cfg: RunConfig, *, device: str | None = None, budget_bytes: int | None = None, bits: int | None = None
) -> MemoryPlan:
    """The memory plan of ``cfg`` before anything loads (the model's config.json is read, no weights).

    Returns a ``MemoryPlan``: ``estimate`` (``total``, ``lines``, ``workload``, ``peak_at``,
    ``trainable_params``; None when the architecture isn't covered, with ``problem`` saying why),
    ``budget``, ``fits``, and for ``batch_size: auto`` the chosen ``batch_size`` × ``grad_accum``;
    ``to_dict()`` is `tunelab estimate --json`.
    """
    from tunelab.memory.plan import estimate_config

    return estimate_config(cfg, device=device, budget_bytes=budget_bytes, bits=bits)
