"""QLoRA's quantized base and the Metal memory limits for the MLX backend.

MLX quantizes with its own affine scheme (per group of ``group_size`` weights:
codes plus a scale and a bias), the format mlx-lm writes for quantized
checkpoints, so a base quantized here and one loaded already quantized are the
same thing to the rest of the backend.
"""

from __future__ import annotations

import logging
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from tunelab.errors import ConfigError

log = logging.getLogger(__name__)

# Keep this share of the wired limit free for the cache: the estimate is a peak, not a reservation.
_CACHE_SHARE = 0.25


def is_quantized(model: nn.Module) -> bool:
    """Whether any layer of ``model`` holds quantized weights (a quantized checkpoint, or after QLoRA's step)."""
    return any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules())


def prepare_base(model: nn.Module, method: str, bits: int, group_size: int) -> None:
    """Quantize the base for qlora (unless the checkpoint already is); refuse methods that train quantized weights.

    A quantized base can only stay frozen: adapters train over it, while its own
    4/8-bit codes can't take gradients (full, freeze), and DoRA's magnitude needs
    the dense weight's row norms.
    """
    if method == "qlora" and is_quantized(model):
        log.info("method: qlora: the checkpoint is already quantized; training over it as stored")
    elif method == "qlora":
        quantize_base(model, bits, group_size)
    if is_quantized(model) and method not in ("lora", "qlora"):
        raise ConfigError(
            f"method: {method} can't train a quantized base (its weights are 4/8-bit codes)",
            hint="use method: lora or qlora, or a full-precision checkpoint",
        )


def quantize_base(model: nn.Module, bits: int, group_size: int) -> int:
    """Quantize every linear and embedding layer whose input width divides into groups; return how many.

    The LM head and embeddings are quantized too (as mlx-lm does, and as the
    memory estimator assumes): they are a large share of a small model's bytes.
    """
    count = 0

    def predicate(_path: str, module: nn.Module) -> bool:
        nonlocal count
        weight = getattr(module, "weight", None)
        ok = hasattr(module, "to_quantized") and weight is not None and weight.shape[-1] % group_size == 0
        count += int(ok)
        return ok

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=predicate)
    if count == 0:
        raise ConfigError(
            f"method.group_size: no layer of this model has an input width divisible by {group_size}",
            hint="use method.group_size: 32, or method: lora",
        )
    mx.eval(model.parameters())
    return count


def in_features(layer: Any) -> int:
    """Input width of a linear layer, plain or quantized (whose weight packs 32 // bits codes per uint32)."""
    if isinstance(layer, nn.QuantizedLinear):
        return int(layer.weight.shape[1]) * 32 // int(layer.bits)
    return int(layer.weight.shape[1])


def set_memory_limits(estimate_bytes: int | None) -> None:
    """On Metal, wire the estimated peak (capped at the recommended working set) and bound the cache.

    Wiring keeps the weights resident instead of paged out between steps; the
    cache limit keeps freed buffers from growing past what the run needs.  A
    CPU has neither limit to set.
    """
    if estimate_bytes is None:
        return
    if not mx.metal.is_available():
        log.debug("mlx on cpu: no wired or cache limit to set (estimate %d bytes)", estimate_bytes)
        return
    info: dict[str, Any] = mx.device_info()
    ceiling = int(info.get("max_recommended_working_set_size", estimate_bytes))
    wired = min(int(estimate_bytes), ceiling)
    mx.set_wired_limit(wired)
    mx.set_cache_limit(int(wired * _CACHE_SHARE))
    log.debug("mlx on metal: wired limit %d bytes, cache limit %d bytes", wired, int(wired * _CACHE_SHARE))
