"""The MLX backend's loss for each objective (``objective.name``): one function per objective.

The backend runs the model (packed caches, the head split that projects only supervised positions)
and hands the objective float32 logits with their targets, same leading shape, ``IGNORE`` where a
position carries no loss; the objective returns ``(summed loss, supervised tokens)`` (a preference
objective: ``(summed loss, units, diagnostics)``, with a dict of targets).  The backend
differentiates that (compiled or not), so an objective added here needs no change elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from tunelab.backends.base import ObjectiveSpec
from tunelab.backends.mlx import preference
from tunelab.backends.mlx.grpo import MlxGrpoLoss
from tunelab.errors import ConfigError
from tunelab.vocab import IGNORE, OBJECTIVES

MlxLoss = Callable[..., Any]  # (logits, targets) -> (summed loss, units[, diagnostics])


def token_cross_entropy(logits: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Summed cross-entropy over the positions whose target is not ``IGNORE``, and their count."""
    mask = targets != IGNORE
    ce = nn.losses.cross_entropy(logits, mx.where(mask, targets, 0), reduction="none")
    return (ce * mask).sum(), mask.sum()


LOSSES: dict[str, Callable[..., Any]] = {
    "sft": token_cross_entropy,
    "dpo": preference.dpo,
    "ipo": preference.ipo,
    "orpo": preference.orpo,
    "simpo": preference.simpo,
    "kto": preference.kto,
    "grpo": MlxGrpoLoss,  # token-level clipped policy loss over sampled completions (tunelab.train.grpo)
}


def loss_for(objective: ObjectiveSpec) -> MlxLoss:
    """The loss function of ``objective``; a name the backend lacks is a config error naming those it has.

    A preference objective's function scores sequences; :class:`MlxPreferenceLoss` runs it on the
    logits and a ``targets`` dict (see :mod:`tunelab.backends.mlx.preference`) and adds diagnostics.
    """
    loss = LOSSES.get(objective.name)
    if loss is None:
        known = ", ".join(name for name in OBJECTIVES if name in LOSSES)
        raise ConfigError(f"objective {objective.name!r} has no MLX loss", hint=f"use one of: {known}")
    if objective.name == "sft":
        return loss
    if objective.name == "grpo":
        return MlxGrpoLoss(objective)
    return preference.MlxPreferenceLoss(objective, loss)
