"""LoRA and DoRA layers for MLX that compute exactly what PEFT computes.

PEFT (per output row o): ``y = W x + b + s · B A dropout(x)`` with ``s = alpha / r``.
DoRA rescales the adapted weight by a learned magnitude over its row norm,
which PEFT treats as a constant in the backward pass (the paper's §4.3), so
``y = W x + b + (m/n − 1) · W x_d + (m/n) · s · B A x_d`` with
``n = stop_gradient(‖W + s·B A‖_row)``.  Matching these makes an MLX run and a
torch run of the same config agree, and an adapter portable between them.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update (and DoRA magnitude if ``dora``)."""

    def __init__(
        self, base: nn.Module, *, rank: int, alpha: float, dropout: float, a_init: np.ndarray, dora: bool
    ) -> None:
        super().__init__()
        # a_init is (rank, in): the input width, which a quantized weight's packed shape doesn't show.
        out_dims, in_dims = base.weight.shape[0], a_init.shape[1]
        self.base = base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(p=dropout) if dropout > 0 else None
        self.lora_a = mx.array(a_init.T.astype(np.float32))  # (in, r): x @ lora_a
        self.lora_b = mx.zeros((rank, out_dims))  # (r, out): zero, so training starts from the base model
        self.dora = dora
        if dora:
            self.magnitude = mx.linalg.norm(base.weight.astype(mx.float32), axis=1)
        self._in_dims = in_dims

    def __call__(self, x: mx.array) -> mx.array:
        y = self.base(x)
        xd = self.dropout(x) if self.dropout is not None else x
        update = (xd @ self.lora_a.astype(x.dtype)) @ self.lora_b.astype(x.dtype)
        if not self.dora:
            return y + self.scale * update
        weight = self.base.weight
        adapted = weight.astype(mx.float32) + self.scale * (self.lora_b.T @ self.lora_a.T)
        norm = mx.stop_gradient(mx.linalg.norm(adapted, axis=1))
        ratio = (self.magnitude / norm).astype(x.dtype)
        plain = xd @ weight.T if self.dropout is not None else y - self._bias(x.dtype)
        return y + (ratio - 1) * plain + ratio * self.scale * update

    def _bias(self, dtype: mx.Dtype) -> mx.array | float:
        return self.base.bias.astype(dtype) if "bias" in self.base else 0.0

    def peft_tensors(self) -> dict[str, np.ndarray]:
        """This layer's trainables under PEFT's names and layouts."""
        parts = {
            "lora_A": np.array(self.lora_a.T.astype(mx.float32)),
            "lora_B": np.array(self.lora_b.T.astype(mx.float32)),
        }
        if self.dora:
            parts["magnitude"] = np.array(self.magnitude.astype(mx.float32))
        return parts

    def load_peft_tensors(self, parts: dict[str, np.ndarray]) -> None:
        self.lora_a = mx.array(parts["lora_A"].T)
        self.lora_b = mx.array(parts["lora_B"].T)
        if self.dora and "magnitude" in parts:
            self.magnitude = mx.array(parts["magnitude"])

    def trainable_names(self) -> list[str]:
        return ["lora_a", "lora_b", "magnitude"] if self.dora else ["lora_a", "lora_b"]


def linear_modules(model: nn.Module, *, skip: tuple[str, ...] = ("lm_head",)) -> dict[str, nn.Module]:
    """Every linear layer (plain or quantized) under the model by HF-style dotted path, except the output head."""
    found = {}
    for path, module in model.named_modules():
        linear = isinstance(module, (nn.Linear, nn.QuantizedLinear))
        if linear and path and path.split(".")[-1] not in skip:
            found[path] = module
    return found


def set_module(model: nn.Module, path: str, value: nn.Module) -> None:
    """Replace the submodule at a dotted path (list indices included)."""
    parent: object = model
    parts = path.split(".")
    for part in parts[:-1]:
        parent = parent[int(part)] if part.isdigit() else getattr(parent, part)  # type: ignore[index]
    leaf = parts[-1]
    if leaf.isdigit():
        parent[int(leaf)] = value  # type: ignore[index]
    else:
        setattr(parent, leaf, value)
