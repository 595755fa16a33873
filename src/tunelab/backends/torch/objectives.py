"""The torch backend's loss for each objective (``objective.name``): one function per objective.

SFT's loss runs the model on a batch and returns ``(summed loss, supervised tokens)``; the backend
scales and differentiates it, so an objective added here needs no change to the backend, the loop or
the protocol.  It takes the arguments of :func:`summed_loss`: the unwrapped causal LM, the callable
for the plain path (the PEFT wrapper), the device batch, whether the chunked LM-head path applies,
the attention implementation and the supervised positions.  A preference objective is a function of
the sequences' scores (:mod:`tunelab.backends.torch.preference`), run by a :class:`PreferenceLoss`
that the backend calls the same way and that also returns the objective's diagnostics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tunelab.backends.base import ObjectiveSpec
from tunelab.backends.torch import preference
from tunelab.backends.torch.grpo import GrpoLoss
from tunelab.backends.torch.loss import summed_loss
from tunelab.errors import ConfigError
from tunelab.vocab import OBJECTIVES

TorchLoss = Callable[..., tuple[Any, ...]]

LOSSES: dict[str, Callable[..., Any]] = {
    "sft": summed_loss,  # token-weighted cross-entropy, chunked through the LM head where it can be
    "dpo": preference.dpo,
    "ipo": preference.ipo,
    "orpo": preference.orpo,
    "simpo": preference.simpo,
    "kto": preference.kto,
    "grpo": GrpoLoss,  # token-level clipped policy loss over sampled completions (tunelab.train.grpo)
}


def loss_for(objective: ObjectiveSpec) -> TorchLoss:
    """The loss function of ``objective``; a name the backend lacks is a config error naming those it has."""
    loss: Any = LOSSES.get(objective.name)
    if loss is None:
        known = ", ".join(name for name in OBJECTIVES if name in LOSSES)
        raise ConfigError(f"objective {objective.name!r} has no torch loss", hint=f"use one of: {known}")
    if objective.name == "sft":
        return loss
    if objective.name == "grpo":
        return GrpoLoss(objective)
    return preference.PreferenceLoss(objective, loss)
