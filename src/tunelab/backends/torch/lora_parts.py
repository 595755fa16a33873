"""A LoRA-wrapped linear layer taken apart: its adapters' output, and its frozen base's input gradient.

Code that differentiates a layer by hand (the kept MLP, the replay's down
projection) needs the two halves separately: the adapters run with autograd
(their weights train), while the frozen base contributes only ``grad @ W`` to
its input's gradient, which is what the base layer's own backward computes.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch import nf4


def active_adapter(module: Any) -> str:
    """The name of a LoRA layer's first active adapter (the only one, where a caller checked that)."""
    return str(next(n for n in module.active_adapters if n in module.lora_A))


def adapter_branch(module: Any, x: torch.Tensor) -> torch.Tensor | None:
    """The sum of a LoRA layer's active adapters' outputs on ``x`` (None for a plain or disabled layer)."""
    if not hasattr(module, "lora_A") or module.disable_adapters or module.merged:
        return None
    total = None
    for name in module.active_adapters:
        if name not in module.lora_A:
            continue
        a, b = module.lora_A[name], module.lora_B[name]
        out = b(a(module.lora_dropout[name](module._cast_input_dtype(x, a.weight.dtype)))) * module.scaling[name]
        total = out if total is None else total + out
    return total


# A 4-bit base layer's attribute holding its weight already dequantized, while a caller keeps it so
# (tiled_mlp: once for all the tiles of one call); None otherwise.
DEQUANTIZED = "_tunelab_dequantized"


def base_weight(module: Any) -> torch.Tensor:
    """The base weight of a (LoRA-wrapped) linear layer in its compute form: 4-bit bases dequantized."""
    base = getattr(module, "base_layer", module)
    held: torch.Tensor | None = getattr(base, DEQUANTIZED, None)
    if held is not None:
        return held
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight
    lean = nf4.takes_triton(weight.device) or nf4.takes_bnb_kernels(weight)  # one kernel, or bitsandbytes', lean
    # IN_GRAPH forced on (True) traces the arithmetic in compiled graphs; its default rides on ``lean``
    if (lean or (nf4.IN_GRAPH is True and torch.compiler.is_compiling())) and nf4.supported(weight):
        return nf4.dequantize(weight, state)
    import bitsandbytes.functional as bnbf  # only QLoRA bases carry a quant_state

    return bnbf.dequantize_4bit(weight.data, state)


def input_grad(module: Any, grad: torch.Tensor) -> torch.Tensor:
    """``grad @ W`` for the frozen base weight ``W`` of a (LoRA-wrapped) linear layer."""
    return weight_input_grad(grad, base_weight(module))


def weight_input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``grad @ W``: the input gradient of ``x @ W.T`` for a frozen ``W`` in its compute form."""
    return torch.matmul(grad, weight.to(grad.dtype))
