"""Attention for packed batches: each example attends only to itself, with its own positions.

transformers (5.x) already knows packed rows.  Given ``position_ids`` that
restart at 0 for each example and *no* 2-D attention mask, its mask builder
splits each row where the positions restart and builds a per-example causal
mask for the attention implementation in use (a boolean mask for ``sdpa``, an
additive one for ``eager``, a block mask for ``flex_attention``), and its
flash path takes the examples' cumulative lengths (``cu_seq_lens_*``) for
variable-length kernels that skip the masked work entirely.  RoPE reads the
restarted positions, so every example sees the positions it would see alone.

A dense per-example mask still computes every (query, key) pair of a row,
most of them masked out.  Off CUDA, :func:`packed_sdpa` (registered with
transformers as ``tunelab_packed_sdpa``) skips most of them: it takes queries
in chunks and gives each chunk only the keys from the start of its earliest
example, so a chunk of short examples attends over a few hundred keys instead
of the whole row (on 2 CPU threads, packed training went from 0.95x to 1.18x
the throughput of length-grouped batches: ``bench/packing_cpu.py``).  FlexAttention would skip the same blocks but
has no CPU backward in torch 2.13, and gathering examples into per-length
buckets measured slower than the dense mask (the gathers' backward costs more
than it saves).  On CUDA, :func:`choose_packed_attention` is the hook:
flash-attention varlen when installed, else PyTorch's own flash varlen kernel
(:func:`torch_varlen`, registered as ``tunelab_varlen``; half precision only),
else FlexAttention, else ``sdpa``.  The varlen kernels take the examples as
one flat sequence with cumulative lengths and never compute a masked-out pair,
which is what makes packing pay on a GPU.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from tunelab.backends.base import ModelSpec
from tunelab.backends.torch import flash4

log = logging.getLogger(__name__)

TORCH_VARLEN = "tunelab_varlen"
VARLEN = ("flash_attention_2", "flash_attention_3", TORCH_VARLEN)
PACKED_SDPA = "tunelab_packed_sdpa"
_CUDA_PREFERENCE = ("flash_attention_2", "flash_attention_3", TORCH_VARLEN, "flex_attention")
_CHUNK = 256  # queries per chunk: smaller trims more keys, larger launches fewer kernels


def choose_attention(model: Any, device: torch.device, spec: ModelSpec) -> str:
    """The attention implementation a run's forward names: :func:`choose_packed_attention`'s for packed rows,
    else the model's own (:func:`choose_row_attention`)."""
    if spec.packing:
        return choose_packed_attention(model, device, spec.attn_implementation)
    choose_row_attention(model, device, spec.attn_implementation, spec.longest_row)
    return str(model.config._attn_implementation)


def choose_packed_attention(model: Any, device: torch.device, requested: str) -> str:
    """Switch ``model`` to the fastest exact attention for packed rows here; return its name.

    An explicit ``model.attn_implementation`` is respected (transformers' own
    packed masks then keep examples apart), as is a model that needs ``eager``
    (soft-capped attention scores, for one).
    """
    current = str(model.config._attn_implementation)
    if requested != "auto":
        return current
    if device.type != "cuda":
        if current != "sdpa":
            return current
        from transformers import AttentionInterface

        AttentionInterface.register(PACKED_SDPA, packed_sdpa)
        model.set_attn_implementation(PACKED_SDPA)
        return PACKED_SDPA
    for name in _CUDA_PREFERENCE:
        if name == TORCH_VARLEN:
            if not torch_varlen_usable(model):
                continue
            from transformers import AttentionInterface

            AttentionInterface.register(TORCH_VARLEN, torch_varlen)
        try:
            model.set_attn_implementation(name)
        except (ImportError, ValueError) as exc:  # kernel not installed, or not supported by this architecture
            log.debug("packed attention: %s unavailable (%s)", name, exc)
            continue
        if model.config._attn_implementation == name:
            if name == TORCH_VARLEN:  # process-wide, so only once torch's flash kernel is the one chosen
                flash4.activate(device)  # FlashAttention 4 behind it, where switched on and installed
            return name
    return current


def choose_row_attention(model: Any, device: torch.device, requested: str, longest: int | None) -> None:
    """Rows that are not packed keep the model's attention; on CUDA its ``sdpa`` may run FlashAttention 4.

    Where :func:`flash4.take_sdpa` finds it pays (rows of ``longest`` tokens) and the package
    installed, and not where ``model.attn_implementation`` was set explicitly.
    """
    if requested == "auto" and device.type == "cuda" and str(model.config._attn_implementation) == "sdpa":
        dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.bfloat16)
        flash4.take_sdpa(device, model.config, longest, dtype)


def torch_varlen_usable(model: Any) -> bool:
    """PyTorch's flash varlen kernel: torch >= 2.10, a half-precision model, causal, no score soft-capping."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    capped = getattr(model.config, "attn_logit_softcapping", None)
    config = model.config
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return dtype in (torch.bfloat16, torch.float16) and not capped and (not window or _varlen_takes("window_size"))


@functools.cache  # asked by every layer of every forward: read the signature once
def _varlen_takes(name: str) -> bool:
    import inspect

    from torch.nn.attention.varlen import varlen_attn

    return name in inspect.signature(varlen_attn).parameters


def torch_varlen(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each packed example through ``torch.nn.attention.varlen`` (transformers' signature).

    ``cu_seq_lens_q`` and ``max_length_q`` come from :func:`varlen_kwargs` via
    the model's forward.  Without them (generation with a KV cache) it is ``sdpa``.
    """
    from torch.nn.attention.varlen import varlen_attn

    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    batch, heads, length, dim = query.shape
    q = query.transpose(1, 2).reshape(batch * length, heads, dim)
    k = key.transpose(1, 2).reshape(batch * length, key.shape[1], dim)
    v = value.transpose(1, 2).reshape(batch * length, value.shape[1], dim)
    options: dict[str, Any] = {"scale": scaling}
    window = kwargs.get("sliding_window")
    if _varlen_takes("window_size"):
        options["window_size"] = (window - 1 if window else -1, 0)  # (-1, 0): causal
    else:
        options["is_causal"] = True
    if k.shape[1] != heads:
        if _varlen_takes("enable_gqa"):
            options["enable_gqa"] = True
        else:
            groups = heads // k.shape[1]
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    longest = kwargs["max_length_q"]
    out: Any = varlen_attn(q, k, v, cu, cu, longest, longest, **options)
    return out.reshape(batch, length, heads, dim), None


def model_inputs(batch: dict[str, torch.Tensor], attention: str) -> dict[str, Any]:
    """Keyword arguments for the model's forward on ``batch`` (packed or padded)."""
    if "position_ids" not in batch:
        return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}
    # No attention_mask on purpose: with one, transformers would not look for example boundaries.
    inputs: dict[str, Any] = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    if attention in VARLEN:
        static = attention == TORCH_VARLEN
        inputs.update(varlen_kwargs(batch["position_ids"], static=static, cu=batch.get(CU_SEQ_LENS)))
    return inputs


# The batch key under which the training step hands over the cumulative example lengths, counted on the host
# (:func:`host_cu_seq_lens`) and copied with the batch.
CU_SEQ_LENS = "cu_seq_lens"
# Whether the training step counts them on the host (False: on the device, as before; bench/gpu_env.sh's switch
# host_counted_off, for an A/B on a GPU).
HOST_COUNTED = True


def host_varlen_arrays(batch: dict[str, np.ndarray], attention: str) -> dict[str, np.ndarray]:
    """What :func:`model_inputs` will need of the host copy of ``batch``: packed rows under a varlen kernel get
    their cumulative lengths (:data:`CU_SEQ_LENS`) counted here, to go to the device with the batch."""
    if "position_ids" not in batch or attention not in VARLEN or not HOST_COUNTED:
        return {}
    return {CU_SEQ_LENS: host_cu_seq_lens(batch["position_ids"])}


def host_cu_seq_lens(position_ids: np.ndarray) -> np.ndarray:
    """:func:`varlen_kwargs`'s cumulative lengths from the host copy of ``position_ids`` (int32).

    Counted on the device, the starts take ``nonzero``, whose output size the host must read back, and the
    total a blocking copy: each step's forward then waited for the previous step's backward and optimizer
    to finish before it could queue its first kernel, and the GPU sat idle while it did.
    """
    flat = position_ids.reshape(-1)
    return np.append(np.flatnonzero(flat == 0), flat.size).astype(np.int32)


def varlen_kwargs(position_ids: torch.Tensor, static: bool = False, cu: torch.Tensor | None = None) -> dict[str, Any]:
    """Cumulative example lengths over the flattened batch, as flash-attention's varlen kernels take them.

    Every example (and each row's padding tail) starts at position 0, so the
    starts are where the flattened positions are 0.  ``cu``: those already
    counted (:func:`host_cu_seq_lens`, on ``position_ids``' device).  With
    ``static`` the longest length is given as the row length, an upper bound
    the kernel accepts: one number for every batch (a compiled layer is not
    recompiled for each new maximum) and no wait for the device to count it.
    """
    if cu is None:
        flat = position_ids.reshape(-1)
        starts = (flat == 0).nonzero().reshape(-1)
        total = torch.tensor([flat.numel()], device=flat.device)
        cu = torch.cat([starts, total]).to(torch.int32)
    longest = position_ids.shape[-1] if static else int(cu.diff().max())
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}


def packed_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention inside each example of packed rows (transformers' attention-function signature).

    Examples are found from ``position_ids`` (every example restarts at 0), so
    ``attention_mask`` is not used; a ``sliding_window`` is honoured.  Anything
    but a whole-sequence forward (decoding with a KV cache) takes plain ``sdpa``.
    """
    positions = kwargs.get("position_ids")  # (batch, length); the decoder layers pass it down
    if positions is None or query.shape[2] != key.shape[2]:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: each key/value head serves `groups` query heads
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    length = query.shape[2]
    index = torch.arange(length, device=query.device)
    starts = index - positions  # where each token's example begins: equal within an example, unique across
    window = kwargs.get("sliding_window")
    chunks = []
    for begin in range(0, length, _CHUNK):
        end = min(length, begin + _CHUNK)
        first = int(starts[:, begin:end].min())  # no query of the chunk sees a key before this
        q_at, k_at = index[begin:end, None], index[None, first:end]
        mask = (starts[:, None, begin:end, None] == starts[:, None, None, first:end]) & (q_at >= k_at)
        if window:
            mask = mask & (q_at - k_at < window)
        chunks.append(
            F.scaled_dot_product_attention(
                query[:, :, begin:end],
                key[:, :, first:end],
                value[:, :, first:end],
                attn_mask=mask,
                dropout_p=dropout,
                scale=scaling,
            )
        )
    return torch.cat(chunks, dim=2).transpose(1, 2).contiguous(), None
