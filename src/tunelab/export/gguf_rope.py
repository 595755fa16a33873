"""Rotary position settings for GGUF: base frequencies, and Llama 3.1's scaling as a ``rope_freqs`` tensor.

transformers keeps rope settings in ``rope_scaling`` (older configs) or
``rope_parameters`` (transformers 5), the latter nested per layer type for
models that mix sliding and full attention (Gemma 3).  llama.cpp takes the
base frequency as a key and, for Llama 3.1-style scaling, one divisor per
rotary frequency as the ``rope_freqs`` tensor, which it applies as
``theta_i / rope_freqs[i]``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from tunelab.errors import ModelError

ROPE_FREQS = "rope_freqs.weight"


def rope_params(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(full-attention rope settings, sliding-attention ones when the config has them separately)."""
    params = dict(config.get("rope_parameters") or {})
    if "full_attention" in params:  # nested per layer type
        return dict(params["full_attention"]), dict(params.get("sliding_attention") or {})
    scaling = config.get("rope_scaling") or {}
    merged = {**scaling, **params}
    if "type" in merged and "rope_type" not in merged:
        merged["rope_type"] = merged["type"]
    merged.setdefault("rope_theta", config.get("rope_theta"))
    return merged, None


def check_rope(config: dict[str, Any], *, llama_arch: bool) -> None:
    """Refuse rope scaling llama.cpp would not reproduce from what the GGUF writer stores."""
    full, sliding = rope_params(config)
    for params in (full, sliding or {}):
        rope_type = params.get("rope_type") or "default"
        if rope_type == "default" or (rope_type == "llama3" and llama_arch and sliding is None):
            continue
        raise ModelError(
            f"GGUF export does not handle rope scaling {rope_type!r} for {config.get('model_type')} yet "
            "(Llama 3.1-style 'llama3' scaling is supported for Llama and Mistral)",
            hint="export --to hf, mlx or onnx instead",
        )


def rope_theta(params: dict[str, Any], default: float = 10000.0) -> float:
    """The base frequency in one rope settings dict."""
    return float(params.get("rope_theta") or default)


def llama3_factors(config: dict[str, Any], head_dim: int) -> np.ndarray | None:
    """Per-frequency divisors for 'llama3' rope scaling, or None when the model has none.

    Computed as transformers' scaled inverse frequencies divided into the
    unscaled ones: short wavelengths keep theirs (1), long ones are divided by
    ``factor``, and the band between blends the two.
    """
    params, _ = rope_params(config)
    if params.get("rope_type") != "llama3":
        return None
    factor = float(params["factor"])
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    old_len = float(params["original_max_position_embeddings"])
    inv_freq = 1.0 / rope_theta(params) ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    out = np.empty_like(inv_freq)
    for i, freq in enumerate(inv_freq):
        wavelen = 2 * math.pi / freq
        if wavelen < old_len / high:
            out[i] = 1.0
        elif wavelen > old_len / low:
            out[i] = factor
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out.astype(np.float32)
