"""QLoRA's 4-bit base weights dequantized by torch code inside the compiled layer, not by bitsandbytes' calls.

bitsandbytes' product dequantizes an NF4 weight through its Python wrapper and
a ctypes call per weight, three kernels with double-quantized scales, for every
projection of every pass.  At 8B QLoRA 2x2048 with offloaded checkpoints that
is 640 weights a step and ~1,900 kernels more than LoRA's, and the GPU waited
on the host: in an H200 profile its kernels kept it busy ~332 ms of a ~433 ms
step, where LoRA's kept it busy ~314 of ~355 (bench/README, step_profile).

The same arithmetic in torch ops compiles into one kernel that inductor
generates inside the layer's graph and launches like the layer's other
kernels: each byte's two 4-bit codes looked up in the 16-value table, times
their block's scale, which is itself an 8-bit code looked up in a 256-value
table, times a scale per 256 blocks, plus an offset; all in fp32, rounded once
to the weight's dtype, as bitsandbytes' kernels compute it.

Only inside a compiled graph: run eagerly, the same ops would hold fp32 and
int32 copies of a whole weight at once (~0.7 GB for an 8B MLP weight), where
bitsandbytes' kernel holds none.  So eager code (a CPU run, ``train.compile:
false``) keeps bitsandbytes' own product.

Off (:data:`IN_GRAPH`) until a GPU shows it pays: checked here on CPUs (bit for bit
against bitsandbytes 0.50.2, eager and compiled), not yet timed on a GPU.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.retype import retype

# Off until an A/B through `tunelab train` on a GPU (bench/vs_unsloth.py) shows the in-graph dequantization pays.
IN_GRAPH = False


def in_graph_4bit(model: Any) -> int:
    """Make the decoder layers' NF4 linears dequantize in the compiled graph; returns how many.

    Runs before the layers are compiled, like the other class-level wrappers (:mod:`retype`).
    """
    from bitsandbytes.nn import Linear4bit  # only QLoRA bases call this (PEFT's wrapper has the same name)

    count = 0
    for layer in decoder_layers(model):
        for module in layer.modules():
            if isinstance(module, Linear4bit) and supported(module.weight):
                retype(module, _InGraph4bit)
                count += 1
    return count


def supported(weight: Any) -> bool:
    """An NF4 weight this module dequantizes: whole blocks, scales in fp32 or double-quantized to 8 bits."""
    state = getattr(weight, "quant_state", None)
    if state is None or state.quant_type != "nf4" or state.code is None or len(state.shape) != 2:
        return False
    numel = int(state.shape[0]) * int(state.shape[1])
    if numel % state.blocksize or numel // state.blocksize != state.absmax.numel():
        return False
    if state.nested:
        inner = state.state2
        return bool(state.absmax.dtype == torch.uint8 and inner.code is not None and inner.code.numel() == 256)
    return bool(state.absmax.dtype == torch.float32)


def dequantize(weight: torch.Tensor, state: Any) -> torch.Tensor:
    """``weight``'s values in ``state.dtype``, from its packed NF4 codes (two per byte, the high nibble first)."""
    packed = weight.view(torch.uint8).reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).to(torch.int32)
    values = state.code[codes].view(-1, state.blocksize)  # fp32, one row per block
    return (values * _block_scales(state)[:, None]).view(tuple(state.shape)).to(state.dtype)


def _block_scales(state: Any) -> torch.Tensor:
    """Each block's absolute maximum in fp32 (double quantization: an 8-bit code, a scale per group, an offset)."""
    if not state.nested:
        return state.absmax
    inner = state.state2
    looked_up = inner.code[state.absmax.to(torch.int32)]  # the 8-bit codes' values
    groups = looked_up.numel()
    per_group = inner.blocksize
    if groups % per_group == 0:
        scaled = (looked_up.view(-1, per_group) * inner.absmax[:, None]).view(-1)
    else:  # a last, partial group
        scaled = looked_up * inner.absmax.repeat_interleave(per_group)[:groups]
    return scaled + state.offset


class _InGraph4bit:
    """Put in front of bitsandbytes' ``Linear4bit``: inside a compiled graph, the weight is dequantized there."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not torch.compiler.is_compiling():
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        weight: Any = self.weight  # type: ignore[attr-defined]
        compute = getattr(self, "compute_dtype", None) or x.dtype
        bias = getattr(self, "bias", None)
        bias = None if bias is None else bias.to(compute)  # added inside the product, rounded once
        return _Nf4Linear.apply(x.to(compute), weight, weight.quant_state, bias).to(x.dtype)


class _Nf4Linear(torch.autograd.Function):
    """``x @ W.T`` for a frozen NF4 ``W``: dequantized for the forward and again for the input's gradient.

    Saving the dequantized weight instead would keep every projection's bf16 copy until backward.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, state: Any, bias: torch.Tensor | None
    ) -> torch.Tensor:
        ctx.state = state
        ctx.save_for_backward(weight)
        return torch.nn.functional.linear(x, dequantize(weight, state).to(x.dtype), bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        (weight,) = ctx.saved_tensors
        return grad @ dequantize(weight, ctx.state).to(grad.dtype), None, None, None
