"""On an offloaded checkpoint's replay, attention runs no forward kernel: the first run parks what backward needs.

An offloaded checkpoint (:mod:`checkpointing`) runs every decoder layer a
second time in backward, only to differentiate it.  A fused attention kernel's
backward (flash, or cuDNN's, which sdpa prefers on Hopper GPUs) needs the
queries, keys and values, the attention's output and its log-sum-exp per
query.  The replay recomputes q, k and v anyway (their projections' adapters
train), but the output and log-sum-exp come from the kernel's forward, which
at long rows is the costliest thing the replay does after the matrix products
(its cost grows with the square of the length, theirs with the length).  Here
the first run parks both with the layer's input: they travel to pinned CPU
memory and back with it, overlapped with compute, and the replay hands them to
the kernel's backward instead of running its forward again.  The output is as
wide as the layer's input, so the copies double; GPU memory grows by about one
layer's output (the next layer's, fetched ahead), and CPU memory by one output
per layer.  Where the outputs and inputs together would pass the budget the
backend gives (half the CPU memory available at start, as for the kept MLP),
the replay runs the forward again, as without this.

It applies where sdpa would take the flash or cuDNN kernel (torch is asked, so
both runs use the kernel sdpa itself would): causal attention over a whole row
with no mask (tunelab's right-padded and full batches), no dropout, no
soft-capping or score bias, head size up to 256, half precision on a GPU (any
float type on a CPU, where the tests run it).  Anything else, in
either run, takes transformers' own ``sdpa`` path, as does every call outside a
checkpoint (evaluation, generation).  Both runs decide from the same arguments,
so a layer either parks and reads back or does neither.

The attention module holds what its first run computed as an attribute
(:data:`KEPT`): a compiled layer sets it as a side effect of its graph, with no
graph break, and the checkpoint takes it off the module straight after the run
(:func:`take`) and puts it back for the replay (:func:`holding`).

Measured through ``tunelab train`` on an H100 (one lease, 10 steps, 3 warm-up;
sdpa ran cuDNN's kernel): 8B QLoRA 1x16,384 with checkpointing 8,353 -> 8,763
tok/s (+4.9%) at 7.36 -> 7.47 GiB; 8B LoRA 2x2048 with checkpointing 11,717 ->
11,809 (+0.8%) at 15.91 -> 15.90 GiB; the same losses to the third decimal.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.attention import SDPBackend

from tunelab.backends.torch import replay
from tunelab.backends.torch.loading import decoder_layers

ON = True  # bench/gpu_env.sh's switch kept_attention_off makes a tree without it, for another A/B
KEPT_SDPA = "tunelab_kept_sdpa"
KEPT = "_tunelab_kept_attention"  # the attribute the first run leaves on the attention module


def keep_attention(model: Any, host_bytes: int | None = None) -> bool:
    """Switch an ``sdpa`` model to the kept attention (same masks, same kernel); False where it isn't ``sdpa``.

    ``host_bytes``: the most CPU memory the parked outputs and the layer inputs
    beside them may take in all; a longer micro-batch runs the forward again.
    """
    if str(model.config._attn_implementation) != "sdpa" or getattr(model.config, "attn_logit_softcapping", None):
        return False
    layers = decoder_layers(model)
    for layer in layers:
        if (attention := getattr(layer, "self_attn", None)) is not None:
            # Each layer's share (the same int in every layer: one compiled graph for all of them)
            attention.kept_room = None if host_bytes is None else host_bytes // max(len(layers), 1)
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
    kernel = _kernel(module, query, key, value, attention_mask, dropout, kwargs) if checkpointed else None
    if kernel is not None:
        scale = scaling if scaling is not None else query.shape[-1] ** -0.5
        room = getattr(module, "kept_room", None)
        fits = room is None or 2 * query.numel() * query.element_size() <= room  # the output and the layer input
        if replay.RECORDING and not torch.is_grad_enabled() and fits:
            out, lse = _forward(kernel, query, key, value, scale)
            # (batch, length, heads, dim), contiguous, as the layer reads it: the copy sdpa's own path makes
            output = out.transpose(1, 2).contiguous()
            setattr(module, KEPT, (output, lse))
            return output, None
        kept = getattr(module, KEPT, None)
        if replay.REPLAYING and kept is not None:
            return _KeptAttention.apply(query, key, value, kept[0], kept[1], scale, kernel), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)


def _kernel(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    dropout: float,
    kwargs: dict[str, Any],
) -> int | None:
    """The fused kernel sdpa would run here (flash or cuDNN), causal over the whole row; None: sdpa's own path.

    Decided from the arguments alone, so the first run and the replay agree.
    """
    if mask is not None or dropout or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return None
    causal = kwargs.get("is_causal")
    if not (causal if causal is not None else getattr(module, "is_causal", True)):
        return None
    length, dim = query.shape[2], query.shape[-1]
    if length < 2 or key.shape[2] != length or not (dim == key.shape[-1] == value.shape[-1] <= 256) or dim % 8:
        return None
    if query.shape[1] % key.shape[1] or query.device.type not in ("cuda", "cpu"):
        return None
    if query.is_cuda and query.dtype not in (torch.float16, torch.bfloat16):
        return None
    device = query.device
    grouped = query.shape[1] != key.shape[1]
    choice = _sdpa_choice(device.type, device.index, query.dtype, query.shape[1], key.shape[1], length, dim, grouped)
    return choice if choice in (_FLASH, _CUDNN) else None


_FLASH, _CUDNN = SDPBackend.FLASH_ATTENTION.value, SDPBackend.CUDNN_ATTENTION.value


@torch._dynamo.assume_constant_result  # a compiled layer asks while it is traced; the answer is in its graph
def _sdpa_choice(
    device_type: str, index: int | None, dtype: torch.dtype, heads: int, kv_heads: int, length: int, dim: int,
    grouped: bool,
) -> int:  # fmt: skip
    """Which backend sdpa picks for causal attention of these sizes (torch >= 2.10 prefers cuDNN on Hopper)."""
    return _probe(device_type, index, dtype, heads, kv_heads, length, dim, grouped)


@functools.cache  # asked by every layer of every eager step
def _probe(
    device_type: str, index: int | None, dtype: torch.dtype, heads: int, kv_heads: int, length: int, dim: int,
    grouped: bool,
) -> int:  # fmt: skip
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    q = torch.empty(1, heads, length, dim, dtype=dtype, device=device)
    kv = torch.empty(1, kv_heads, length, dim, dtype=dtype, device=device)
    return int(torch._fused_sdp_choice(q, kv, kv, None, 0.0, True, scale=None, enable_gqa=grouped))


def _forward(kernel: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, ...]:
    """The kernel's output (batch, heads, length, dim) and log-sum-exp; grouped k/v heads taken as they are."""
    if not q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True, scale=scale)
        return out, lse
    if kernel == _CUDNN:
        found = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, True, False, scale=scale)
    else:
        found = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, True, False, scale=scale)
    return found[0], found[1]


class _KeptAttention(torch.autograd.Function):
    """The replay's attention: the parked output as its value, the kernel's own backward as its gradient."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        output: torch.Tensor,
        lse: torch.Tensor,
        scale: float,
        kernel: int,
    ) -> torch.Tensor:
        ctx.scale, ctx.kernel = scale, kernel
        ctx.save_for_backward(q, k, v, output, lse)
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        q, k, v, output, lse = ctx.saved_tensors
        # back to (batch, heads, length, dim); the gradient and the output have the same strides
        grad, out = grad.transpose(1, 2), output.transpose(1, 2)
        length, scale = q.shape[2], ctx.scale
        if not q.is_cuda:
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                grad, q, k, v, out, lse, 0.0, True, scale=scale
            )
        elif ctx.kernel == _CUDNN:  # the random state is read only with dropout, which is 0
            seed = offset = torch.zeros((), dtype=torch.int64, device=q.device)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
                grad, q, k, v, out, lse, seed, offset, None, None, None, length, length, 0.0, True, scale=scale
            )
        else:
            seed = torch.zeros(2, dtype=torch.uint64, device=q.device)
            offset = torch.zeros((), dtype=torch.uint64, device=q.device)
            dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
                grad, q, k, v, out, lse, None, None, length, length, 0.0, True, seed, offset, scale=scale
            )
        return dq, dk, dv, None, None, None, None
