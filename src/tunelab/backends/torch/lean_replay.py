"""On a checkpoint's replay, each decoder layer's down projection skips its base product.

An offloaded checkpoint (:mod:`checkpointing`) runs every decoder layer a
second time in backward, only to differentiate it, and a tiled MLP
(:mod:`tiled_mlp`) runs each tile again for the same reason.  In layers that
end in ``residual + mlp(x)`` nothing reads the MLP's output on that second run:
only its gradient flows back.  The down projection is the MLP's last step, so
its frozen base product (``x @ W_down.T``, a quarter of an 8B Llama layer's
matrix work) computes a value nobody reads.  Here that product is replaced on
the replay by an autograd function whose value is zeros and whose backward is
the base's own input gradient, ``grad @ W_down``; the adapters' small branch
still runs with autograd, since its weights train.  A step with checkpointing
then does about 2.75 units of the base's matrix work instead of 3, and every
gradient is what the full product gives (the base contributes to the input's
gradient only through ``W_down``, never through its output value).

It applies to frozen bases in bf16/fp16/fp32 and to 4-bit (QLoRA) bases,
under plain LoRA adapters.  Weight-decomposed adapters (DoRA) read the base's
output and keep the full product; so do 8-bit bases.  A 4-bit base's NF4
weight is dequantized inside the compiled layer's graph (bitsandbytes'
dequantize is a traced op, or :mod:`nf4`'s own: no graph break), once, for the backward's
``grad @ W``, where bitsandbytes' own product dequantizes for its forward and
again for its backward.  Measured through ``tunelab train`` (8B QLoRA 2x2048
with checkpointing, H200, one lease): 8,963 -> 9,465 tok/s, the same losses to
the third decimal.  A first version that dequantized in eager code, outside
the graph, was slower than none (H100: 9,759 -> 8,868 tok/s).

A down projection with A joined below W (:mod:`joined_a`) replays through
:func:`joined_a.replayed`: the same zeros, and its input gradient in one product.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch import joined_a, replay
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.lora_parts import adapter_branch, base_weight, weight_input_grad
from tunelab.backends.torch.retype import retype
from tunelab.backends.torch.tiled_mlp import RESIDUAL_MLP_MODELS


def lean_down_projections(model: Any) -> int:
    """Make each decoder layer's down projection skip its base product on replays; returns how many.

    Runs before the layers are compiled: the compiled layer then holds one graph
    for the first run (no gradients) and one for the replay, shared by all layers.
    """
    if str(getattr(model.config, "model_type", "")) not in RESIDUAL_MLP_MODELS:
        return 0
    count = 0
    for layer in decoder_layers(model):
        down = getattr(getattr(layer, "mlp", None), "down_proj", None)
        if down is None or _why_not(down) is not None:
            continue
        retype(down, _LeanDown)
        count += 1
    return count


def _why_not(module: Any) -> str | None:
    if getattr(module, "lora_variant", None):
        return "weight-decomposed adapters read the base's output"
    weight = getattr(getattr(module, "base_layer", module), "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.requires_grad:
        return "the base weight trains"
    if getattr(weight, "quant_state", None) is not None:
        return None  # a 4-bit base: dequantized in the graph for the backward
    if not weight.is_floating_point():
        return "an 8-bit base keeps its product"
    return None


class _LeanDown:
    """Put in front of a down projection's class: on a replay with gradients, no base product."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not replay.differentiating():
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        if joined_a.takes(self, kwargs):
            return joined_a.replayed(self, x)  # A joined below W: one product for the input's gradient
        base = _UnreadLinear.apply(x, base_weight(self))
        branch = adapter_branch(self, x)
        return base if branch is None else base + branch


class _UnreadLinear(torch.autograd.Function):
    """``x @ W.T`` for a frozen ``W`` whose value is never read: zeros forward, ``grad @ W`` backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(weight)
        return x.new_zeros(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return weight_input_grad(grad, weight), None
