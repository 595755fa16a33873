"""FlashAttention 4 behind torch's flash kernels, where it is installed and pays.

torch (2.11 and later) can route its flash kernels to FlashAttention 4 (the
``flash_attn.cute`` package, CuTe DSL kernels for Hopper and Blackwell): same
call, same inputs, another kernel.  torch's own ``"FA4"`` registration fails
on every call with the package's betas from 4.0.0b20 on (they return more than
torch unpacks; 4.0.0b10 fitted), so :func:`_route` registers torch's FA4 glue against
:mod:`flash4_kernels`, which trims the return values.

Rows that are not packed (``data.packing`` is off by default) run
transformers' ``sdpa``, which on a Hopper GPU takes cuDNN's kernel before the
flash one, so :func:`take_sdpa` also turns cuDNN's off for the process: sdpa
then picks flash, and so FlashAttention 4.  Measured on an H100 (2026-12-07,
bench/README.md): over whole causal rows with 32 query heads on 8, forward +
backward, 1.13x cuDNN's speed at 16,384 tokens but 0.75x at 2x2,048 (head
size 128), and through ``tunelab train`` +2.7% on 8B QLoRA at 16,384 tokens
and level on 1B 8x2,048.  So by default (:data:`ON` ``"long"``) it takes rows
from :data:`LONG_FROM` tokens only.

torch's FA4 kernels raise on a call they can't take instead of falling back,
so a model whose attention they can't serve keeps torch's kernels
(:func:`serves`): attention dropout (raised in training), head sizes outside
8-128 or not a multiple of 8.  And since they are compiled on first use, for
this GPU, CUDA and package, :func:`take_sdpa` first runs a small training
step and a sampling step through them (:func:`_runs`): a failure leaves the run
on torch's kernels.  Packed rows (:func:`activate`, through
``torch.nn.attention.varlen``) take it only when switched on outright
(``ON = True``: unmeasured through ``tunelab train``) and where torch's FA4
backward accepts varlen's causal window (2.11's refuses it as "windowed").
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# True: packed and whole rows; "long": whole rows from LONG_FROM tokens (measured to pay there); False: never.
ON: bool | str = "long"
LONG_FROM = 16_384
# The name tunelab's registration goes by in torch's registry, and the module torch takes the kernels from.
IMPL = "FA4-tunelab"
ADAPTER = "tunelab.backends.torch.flash4_kernels"
# Compute capabilities FlashAttention 4 has kernels for (Hopper, Blackwell).
MAJORS = (9, 10)


def pays(config: Any, longest: int | None) -> bool:
    """Whether whole rows of ``longest`` tokens through this model's attention should take FlashAttention 4."""
    wanted = ON is True or (ON == "long" and longest is not None and longest >= LONG_FROM)
    return wanted and serves(config)


def serves(config: Any) -> bool:
    """Whether FlashAttention 4's kernels take this model's attention calls (else they raise, not fall back)."""
    if float(getattr(config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    size = _head_size(config)
    return size is not None and 8 <= size <= 128 and size % 8 == 0


def _head_size(config: Any) -> int | None:
    heads = getattr(config, "num_attention_heads", None)
    return getattr(config, "head_dim", None) or (config.hidden_size // heads if heads else None)


def activate(device: torch.device) -> bool:
    """Packed rows: route torch's flash kernels (varlen's) to FlashAttention 4 where it applies; returns whether.

    Process-wide (the dispatcher's kernels): a training process runs one model.
    """
    return ON is True and _backward_takes_varlen() and _route(device)


def take_sdpa(device: torch.device, config: Any, longest: int | None, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whole rows: route sdpa's flash backend to FlashAttention 4 and prefer it to cuDNN's; returns whether.

    ``longest``: tokens in the longest training row (:data:`ON` ``"long"`` needs
    :data:`LONG_FROM`); ``dtype``: the model's.  Process-wide, as the activation is.
    """
    if not pays(config, longest) or not _route(device):
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    if not _runs(device, config, dtype):
        _unroute()
        return False
    log.info("FlashAttention 4 runs sdpa's attention (cuDNN's kernel turned off)")
    return True


def _runs(device: torch.device, config: Any, dtype: torch.dtype) -> bool:
    """Whether sdpa runs as the model's layers will call it: a causal forward and backward over a row, and,
    as ``train.sample_every``'s answers do, one new token against cached keys, without gradients.

    Its kernels are compiled on first use for this head size, GPU and package: a failure there (a
    CUDA toolkit or package torch's glue can't use: 4.0.0b40 through torch's stock glue failed on every
    call) would otherwise stop the run at its first step, after the model loaded.
    """
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    size = _head_size(config)
    assert size is not None  # take_sdpa asks only where serves() found one
    try:
        q, k, v = (
            torch.randn(1, h, 256, size, device=device, dtype=dtype, requires_grad=True)
            for h in (heads, kv_heads, kv_heads)
        )
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != heads)
        out.float().sum().backward()
        with torch.inference_mode():
            F.scaled_dot_product_attention(q.detach()[:, :, -1:], k.detach(), v.detach(), enable_gqa=kv_heads != heads)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # a kernel's failure surfaces here, not at its launch
    except Exception as exc:  # whatever its kernels raise, torch's own take the run
        log.warning("FlashAttention 4 failed a trial step (%s: %s): torch's kernels run", type(exc).__name__, exc)
        return False
    return True


def _unroute() -> None:
    """Back to cuDNN's kernel for sdpa, and torch's own flash kernels where this torch can restore them."""
    torch.backends.cuda.enable_cudnn_sdp(True)  # sdpa prefers cuDNN's again, whichever flash is routed
    try:
        from torch.nn.attention import restore_flash_attention_impl
    except ImportError:
        return
    restore_flash_attention_impl()


def _backward_takes_varlen() -> bool:
    """torch 2.11's FA4 backward refuses any window, and varlen always passes causal as the window (-1, 0)."""
    try:
        from torch.nn.attention._fa4 import _fa4_backward_support_error
    except ImportError:
        return False
    return "window_size_left" not in inspect.signature(_fa4_backward_support_error).parameters


def _route(device: torch.device) -> bool:
    """Register tunelab's FlashAttention 4 with torch's dispatcher on ``device``'s kind of GPU; returns whether."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in MAJORS:
        return False
    try:
        from torch.nn.attention import activate_flash_attention_impl, register_flash_attention_impl
        from torch.nn.attention._fa4 import register_flash_attention_fa4
    except ImportError:  # torch before 2.11
        log.info("FlashAttention 4: this torch cannot route its flash kernels to it")
        return False
    try:
        # torch's own FA4 registration, pointed at the adapter that fits every beta's return values
        register_flash_attention_impl(IMPL, register_fn=lambda: register_flash_attention_fa4(ADAPTER))
        activate_flash_attention_impl(IMPL)
    except ImportError as exc:  # flash_attn.cute, or what it needs, not installed
        log.info("FlashAttention 4 not installed (%s; pip install 'tunelab[flash4]'): torch's kernels run", exc)
        return False
    except (RuntimeError, ValueError) as exc:  # a package torch's glue can't use
        log.info("FlashAttention 4 unavailable (%s): torch's kernels run", exc)
        return False
    log.info("FlashAttention 4 runs torch's flash kernels")
    return True
