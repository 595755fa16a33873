"""``train.batch_size: auto``: the largest micro-batch that fits, keeping the effective batch.

The effective batch (examples per optimizer step) is what the user asked for:
``train.effective_batch_size``, or ``4 × grad_accum`` when that is not set.
The micro-batch is the largest *divisor* of it whose estimated peak stays
under the budget with a safety margin, and ``grad_accum`` makes up the rest,
so the optimizer sees exactly the batch that was asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tunelab.errors import ConfigError

SAFETY = 0.9  # keep 10% of the budget free: estimates err, and other programs use memory too
GiB = 2**30


@dataclass(frozen=True)
class AutoBatch:
    """The chosen micro-batch and accumulation (their product is the effective batch)."""

    batch_size: int
    grad_accum: int
    peak_bytes: int


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, largest first."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)}, reverse=True)


def choose_batch(peak_for: Callable[[int], int], budget: int, effective: int, *, safety: float = SAFETY) -> AutoBatch:
    """The largest divisor ``b`` of ``effective`` with ``peak_for(b) <= safety × budget``.

    ``peak_for`` is monotonic in the batch size (the estimator is), so the first
    divisor that fits, from the top, is the answer.
    """
    limit = int(budget * safety)
    for size in divisors(effective):
        peak = peak_for(size)
        if peak <= limit:
            return AutoBatch(size, effective // size, peak)
    need = peak_for(1)
    raise ConfigError(
        f"train.batch_size: auto: even one sequence needs about {need / GiB:.1f} GiB, "
        f"more than {safety:.0%} of the {budget / GiB:.1f} GiB available",
        hint="turn on train.gradient_checkpointing, lower data.max_seq_len, or use a smaller model",
    )
