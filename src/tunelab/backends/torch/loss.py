"""Causal-LM loss that projects only the supervised positions through the LM head.

With prompt masking most positions carry no loss, and for small models the
vocabulary projection is a large share of the FLOPs; gathering the supervised
hidden states first skips that work while computing exactly the same summed
cross-entropy, and the head + loss then run in chunks of positions
(:mod:`linear_ce`), so the fp32 logits of a whole batch never exist at once.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.backends.torch.attention import model_inputs
from tunelab.backends.torch.linear_ce import is_plain_linear, linear_cross_entropy
from tunelab.vocab import IGNORE


def supports_hidden_path(model: Any) -> bool:
    """Whether the decoder/LM-head split reproduces the model's own logits.

    Architectures that rescale logits in their forward (logit_scale, logits_scaling)
    and prompt-injecting adapters (prefix tuning) take the plain path instead.
    """
    config = model.config
    if getattr(config, "logit_scale", None) not in (None, 1.0):
        return False
    if getattr(config, "logits_scaling", None) not in (None, 1.0):
        return False
    return hasattr(model, "get_decoder") and model.get_output_embeddings() is not None


def supervised_positions(labels: np.ndarray) -> np.ndarray:
    """Flat indices of the positions that carry a loss (over ``labels[:, 1:]``), from the host copy.

    Computed before the batch goes to the device, so selecting them there is a
    gather, not a boolean mask: a mask needs its count on the host, which would
    stall the CPU until the GPU has finished the forward.
    """
    return np.flatnonzero(labels[:, 1:] != IGNORE)


def summed_loss(
    causal_lm: Any,
    forward: Any,
    batch: dict[str, torch.Tensor],
    fast: bool,
    attention: str = "sdpa",
    positions: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Return (sum of token cross-entropies, number of supervised tokens).

    ``causal_lm`` is the unwrapped transformers model; ``forward`` is the callable
    to use for the plain path (the PEFT wrapper, so prompt adapters apply).
    Packed batches (with ``position_ids``) keep attention per example on both
    paths; ``attention`` names the implementation, for the inputs it needs.
    ``positions`` (from :func:`supervised_positions`) are found from the labels
    when not given.
    """
    labels = batch["labels"][:, 1:]
    if positions is None:
        positions = (labels.reshape(-1) != IGNORE).nonzero().reshape(-1)
    tokens = int(positions.numel())
    targets = labels.reshape(-1).index_select(0, positions)
    inputs = model_inputs(batch, attention)
    cap = getattr(causal_lm.config, "final_logit_softcapping", None)
    if fast:
        hidden = causal_lm.get_decoder()(**inputs, use_cache=False).last_hidden_state[:, :-1]
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)
        head = causal_lm.get_output_embeddings()
        if is_plain_linear(head):  # chunked: the full fp32 logits never exist
            return linear_cross_entropy(hidden, head, targets, softcap=cap), tokens
        logits = head(hidden)
    else:
        out = forward(**inputs, use_cache=False)
        logits = out.logits[:, -labels.shape[1] - 1 : -1]
        logits = logits.reshape(-1, logits.shape[-1]).index_select(0, positions)
    logits = logits.float()
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets, reduction="sum"), tokens
