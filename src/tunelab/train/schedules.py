"""Learning-rate schedules as pure functions of the step (so resume needs no scheduler state)."""

from __future__ import annotations

import math
from collections.abc import Callable

Schedule = Callable[[int], float]


def warmup_steps(warmup: float, total_steps: int) -> int:
    """``warmup`` < 1 is a fraction of the run, otherwise a number of steps."""
    return round(warmup * total_steps) if 0 < warmup < 1 else int(warmup)


def make_schedule(name: str, *, lr: float, total_steps: int, warmup: int) -> Schedule:
    """LR for 0-based step ``s``: linear warm-up to ``lr``, then constant, linear or cosine decay to 0."""

    def schedule(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        if name == "constant":
            return lr
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if name == "linear":
            return lr * (1.0 - progress)
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))

    return schedule
