"""On an offloaded checkpoint's replay, attention runs no forward kernel: the first run parks what backward needs.

An offloaded checkpoint (:mod:`checkpointing`) runs every decoder layer a
second time in backward, only to differentiate it.  The flash kernel's backward
needs the queries, keys and values, the attention's output and its log-sum-exp
per query; the replay recomputes q, k and v anyway (their projections' adapters
train), but the output and log-sum-exp come from the attention's forward
kernel, which at long rows is the costliest thing the replay does after the
matrix products (at 16k tokens its cost grows with the square of the length,
the products' only with the length).  Here the first run parks both with the
layer's input: they travel to pinned CPU memory and back with it, overlapped
with compute, and the replay hands them to the flash kernel's backward instead
of running its forward again.  The output is as wide as the layer's input, so
the copies double; GPU memory grows by the output of the layer being replayed
and of the one fetched ahead.

It applies where the first run would take the flash kernel: causal attention
over a whole row with no mask (tunelab's right-padded and full batches), no
dropout, no soft-capping or score bias, head size up to 256, half precision on
a GPU (any float type on a CPU, where the tests run it).  Anything else, in
either run, takes transformers' own ``sdpa`` path, as does every call outside a
checkpoint (evaluation, generation).  Both runs decide from the same arguments,
so a layer either parks and reads back or does neither.

The attention module holds what its first run computed as an attribute
(:data:`KEPT`): a compiled layer sets it as a side effect of its graph, with no
graph break, and the checkpoint takes it off the module straight after the run
(:func:`take`) and puts it back for the replay (:func:`holding`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from tunelab.backends.torch import replay

ON = False  # until an A/B through `tunelab train` on a GPU shows it pays; bench/gpu_env.sh switch: kept_attention
KEPT_SDPA = "tunelab_kept_sdpa"
KEPT = "_tunelab_kept_attention"  # the attribute the first run leaves on the attention module


def keep_attention(model: Any) -> bool:
    """Switch an ``sdpa`` model to the kept attention (same masks, same kernel); False where it isn't ``sdpa``."""
    if str(model.config._attn_implementation) != "sdpa" or getattr(model.config, "attn_logit_softcapping", None):
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(KEPT_SDPA, kept_sdpa)
    AttentionMaskInterface.register(KEPT_SDPA, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])  # sdpa's masks, as before
    model.set_attn_implementation(KEPT_SDPA)
    return str(model.config._attn_implementation) == KEPT_SDPA


def take(layer: Any) -> tuple[torch.Tensor, ...]:
    """What ``layer``'s attention parked in the run just done, taken off the module (empty if nothing)."""
    attention = getattr(layer, "self_attn", None)
    return tuple(attention.__dict__.pop(KEPT, None) or ()) if attention is not None else ()


@contextlib.contextmanager
def holding(layer: Any, kept: tuple[torch.Tensor, ...]) -> Iterator[None]:
    """``layer``'s attention holds ``kept`` for the replay inside the block (nothing when empty)."""
    attention = getattr(layer, "self_attn", None)
    if not kept or attention is None:
        yield
        return
    attention.__dict__[KEPT] = kept
    try:
        yield
    finally:
        attention.__dict__.pop(KEPT, None)


def kept_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``sdpa``, parking or reading back where it applies."""
    checkpointed = replay.RECORDING or replay.REPLAYING
    if checkpointed and _flash_applies(module, query, key, value, attention_mask, dropout, kwargs):
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        if replay.RECORDING and not torch.is_grad_enabled():
            out, lse = _flash_forward(query, key, value, scale)
            output = out.transpose(1, 2)  # (batch, length, heads, dim): contiguous, as the layer reads it
            setattr(module, KEPT, (output, lse))
            return output, None
        kept = getattr(module, KEPT, None)
        if replay.REPLAYING and kept is not None:
            return _KeptAttention.apply(query, key, value, kept[0], kept[1], scale), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _flash_applies(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> bool:
    """Whether ``sdpa`` would run the flash kernel here, causal over the whole row (the same in both runs)."""
    if mask is not None or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return False
    causal = kwargs.get("is_causal")
    if not (causal if causal is not None else getattr(module, "is_causal", True)):
        return False
    length, dim = query.shape[2], query.shape[-1]
    if length < 2 or key.shape[2] != length or not (dim == key.shape[-1] == value.shape[-1] <= 256):
        return False
    if query.shape[1] % key.shape[1]:
        return False
    if query.is_cuda:
        return query.dtype in (torch.float16, torch.bfloat16)
    return query.device.type == "cpu"


def _flash_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """The flash kernel's output (batch, heads, length, dim) and log-sum-exp; grouped k/v heads taken as they are."""
    if q.is_cuda:
        found = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
        return found[0], found[1]
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
    return out, lse


class _KeptAttention(torch.autograd.Function):
    """The replay's attention: the parked output as its value, the flash kernel's backward as its gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        output: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.scale = scale
        ctx.save_for_backward(q, k, v, output, lse)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, output, lse = ctx.saved_tensors
        grad, out = grad.transpose(1, 2), output.transpose(1, 2)  # back to (batch, heads, length, dim)
        if q.is_cuda:
            length = q.shape[2]
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)  # read only with dropout, which is 0
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad, q, k, v, out, lse, None, None, length, length, 0.0, True, seed, offset, scale=ctx.scale
            )
        else:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, q, k, v, out, lse, 0.0, True, scale=ctx.scale
            )
        return dq, dk, dv, None, None, None
