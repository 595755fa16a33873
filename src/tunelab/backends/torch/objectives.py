"""The torch backend's loss for each objective (``objective.name``): one function per objective.

A loss function runs the model on a batch and returns ``(summed loss, supervised tokens)``; the backend
scales and differentiates it, so an objective added here (a preference or RL loss) needs no change to
the backend, the loop or the protocol.  Every function takes the arguments of :func:`summed_loss`:
the unwrapped causal LM, the callable for the plain path (the PEFT wrapper), the device batch, whether
the chunked LM-head path applies, the attention implementation and the supervised positions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tunelab.backends.base import ObjectiveSpec
from tunelab.backends.torch.loss import summed_loss
from tunelab.errors import ConfigError
from tunelab.vocab import OBJECTIVES

TorchLoss = Callable[..., tuple[torch.Tensor, int]]

LOSSES: dict[str, TorchLoss] = {
    "sft": summed_loss,  # token-weighted cross-entropy, chunked through the LM head where it can be
}


def loss_for(objective: ObjectiveSpec) -> TorchLoss:
    """The loss function of ``objective``; a name the backend lacks is a config error naming those it has."""
    loss: Any = LOSSES.get(objective.name)
    if loss is None:
        known = ", ".join(name for name in OBJECTIVES if name in LOSSES)
        raise ConfigError(f"objective {objective.name!r} has no torch loss", hint=f"use one of: {known}")
    return loss
