"""Attention for packed batches: each example attends only to itself, with its own positions.

transformers (5.x) already knows packed rows.  Given ``position_ids`` that
restart at 0 for each example and *no* 2-D attention mask, its mask builder
splits each row where the positions restart and builds a per-example causal
mask for the attention implementation in use (a boolean mask for ``sdpa``, an
additive one for ``eager``, a block mask for ``flex_attention``), and its
flash path takes the examples' cumulative lengths (``cu_seq_lens_*``) for
variable-length kernels that skip the masked work entirely.  RoPE reads the
restarted positions, so every example sees the positions it would see alone.

On a CPU the dense masked ``sdpa`` is what we use: FlexAttention has no CPU
backward in torch 2.13, and gathering examples into per-length buckets for
``is_causal`` kernels measured slower than the masked kernel at these sizes
(the gathers' backward costs more than the masked-out work it saves).  On CUDA,
:func:`choose_packed_attention` is the hook: flash-attention varlen when
installed, else FlexAttention (block-sparse), else ``sdpa``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

log = logging.getLogger(__name__)

VARLEN = ("flash_attention_2", "flash_attention_3")
_CUDA_PREFERENCE = (*VARLEN, "flex_attention")


def choose_packed_attention(model: Any, device: torch.device, requested: str) -> str:
    """Switch ``model`` to the fastest exact attention for packed rows here; return its name.

    An explicit ``model.attn_implementation`` is respected.  Off CUDA the
    model's own choice (``sdpa`` or ``eager``) already honours packed rows.
    """
    current = str(model.config._attn_implementation)
    if requested != "auto" or device.type != "cuda":
        return current
    for name in _CUDA_PREFERENCE:
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as exc:  # kernel not installed, or not supported by this architecture
            log.debug("packed attention: %s unavailable (%s)", name, exc)
            continue
        if model.config._attn_implementation == name:
            return name
    return current


def model_inputs(batch: dict[str, torch.Tensor], attention: str) -> dict[str, Any]:
    """Keyword arguments for the model's forward on ``batch`` (packed or padded)."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    # No attention_mask on purpose: with one, transformers would not look for example boundaries.
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if attention in VARLEN:
        inputs.update(varlen_kwargs(batch["position_ids"]))
    return inputs


def varlen_kwargs(position_ids: torch.Tensor) -> dict[str, Any]:
    """Cumulative example lengths over the flattened batch, as flash-attention's varlen kernels take them.

    Every example (and each row's padding tail) starts at position 0, so the
    starts are where the flattened positions are 0.
    """
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().reshape(-1)
    total = torch.tensor([flat.numel()], device=flat.device)
    cu = torch.cat([starts, total]).to(torch.int32)
    longest = int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
