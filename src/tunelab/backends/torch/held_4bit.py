"""On a checkpoint's replay, 4-bit attention projections dequantize their weight once for both of its uses.

A replayed layer runs forward only to be differentiated.  bitsandbytes' 4-bit
product dequantizes the weight for the forward's ``x W^T`` and again, in its
backward, for ``grad @ W``: with QLoRA and checkpointing, each of q, k, v and o
is dequantized three times a step (the first forward, the replay, its
backward), a weight and its block scales each time, every one a call through
bitsandbytes' Python wrapper.  On an H100 at 8B QLoRA 2x2048 that was 640
weights and 640 scales a step, ~25 ms of kernels and the host time around them
(bench/README.md, session 38's profile).  Here, on the replay, the base layer's
product is a plain ``F.linear`` on the weight dequantized once
(:func:`lora_parts.base_weight`), which autograd keeps for the backward: 4 of
the ~20 dequantizations of a layer's step go, for the attention weights held
through the replayed layer's backward (84 MB at 8B in bf16; the MLP's are
~4× larger and keep bitsandbytes' product).

Off (:data:`ON`) until an A/B through ``tunelab train`` on a GPU
(``bench/gpu_env.sh``'s switch ``held_4bit``); if it goes on, the memory
estimate must count the held weights.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch import replay
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import base_weight
from tunelab.backends.torch.retype import retype

ON = False
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def hold_on_replay(model: Any) -> int:
    """Give each decoder layer's 4-bit attention base layers the held product on replays; returns how many."""
    count = 0
    for layer in decoder_layers(model):
        attention = getattr(layer, "self_attn", None)
        for name in TARGETS:
            module = getattr(attention, name, None)
            base = getattr(module, "base_layer", module)
            weight = getattr(base, "weight", None)
            if getattr(weight, "quant_state", None) is None or getattr(base, "bias", None) is not None:
                continue  # not a 4-bit base (or one with a bias, which no Llama-style projection has)
            retype(base, _HeldOnReplay)
            count += 1
    return count


class _HeldOnReplay:
    """Put in front of a 4-bit base layer's class: on a replay with gradients, one dequantization."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not replay.differentiating():
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        weight = base_weight(self)
        return torch.nn.functional.linear(x.to(weight.dtype), weight).to(x.dtype)
