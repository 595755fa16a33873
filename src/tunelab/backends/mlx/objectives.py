"""The MLX backend's loss for each objective (``objective.name``): one function per objective.

The backend runs the model (packed caches, the head split that projects only supervised positions)
and hands the objective float32 logits with their targets, same leading shape, ``IGNORE`` where a
position carries no loss; the objective returns ``(summed loss, supervised tokens)``.  The backend
differentiates that (compiled or not), so an objective added here needs no change elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn

from tunelab.backends.base import ObjectiveSpec
from tunelab.errors import ConfigError
from tunelab.vocab import IGNORE, OBJECTIVES

MlxLoss = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


def token_cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the positions whose target is not ``IGNORE``, and their count."""
    mask = targets != IGNORE
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return (ce * mask).sum(), mask.sum()


LOSSES: dict[str, MlxLoss] = {"sft": token_cross_entropy}


def loss_for(objective: ObjectiveSpec) -> MlxLoss:
    """The loss function of ``objective``; a name the backend lacks is a config error naming those it has."""
    loss = LOSSES.get(objective.name)
    if loss is None:
        known = ", ".join(name for name in OBJECTIVES if name in LOSSES)
        raise ConfigError(f"objective {objective.name!r} has no MLX loss", hint=f"use one of: {known}")
    return loss
