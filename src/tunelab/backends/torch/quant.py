"""QLoRA's quantized base for the torch backend: bitsandbytes NF4 (or 8-bit) weights.

Only the decoder blocks' linear layers are quantized (transformers keeps the
LM head and embeddings out of bitsandbytes); LoRA is then added by PEFT as for
plain LoRA.  PEFT's ``prepare_model_for_kbit_training`` is deliberately not
used: it upcasts every non-quantized parameter (embeddings, norms, head) to
fp32, ~4 GiB more for an 8B Llama-3 and no accuracy gain for a frozen base.
The memory estimator assumes those stay in the compute dtype, as here.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from tunelab.errors import BackendError

_USE_MLX = 'use backend: mlx (pip install "tunelab[mlx]"; it quantizes on any CPU) or a machine with a CUDA GPU'


def bnb_config(bits: int, compute_dtype: torch.dtype, device: torch.device) -> Any:
    """transformers' ``BitsAndBytesConfig`` for a ``bits``-bit base, after checking bitsandbytes runs here."""
    _require_bitsandbytes(device)
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def _require_bitsandbytes(device: torch.device) -> None:
    """Fail before loading when bitsandbytes is missing or can't quantize on ``device``."""
    if importlib.util.find_spec("bitsandbytes") is None:
        where = "this CUDA GPU" if device.type == "cuda" else f"the torch backend on {device.type}"
        raise BackendError(
            f"method: qlora on {where} needs bitsandbytes, which is not installed",
            hint=("install it with: pip install bitsandbytes; or " if device.type == "cuda" else "") + _USE_MLX,
        )
    if device.type == "cuda":
        return
    # Off CUDA, bitsandbytes' support depends on its version and build: probe a tiny quantization.
    try:
        import bitsandbytes.functional as bnbf

        bnbf.quantize_4bit(torch.randn(64, 64, device=device), quant_type="nf4")
    except Exception as exc:  # any failure means "no working backend for this device"
        raise BackendError(
            f"method: qlora: bitsandbytes has no working backend for {device.type} here ({type(exc).__name__}: {exc})",
            hint=_USE_MLX,
        ) from None
