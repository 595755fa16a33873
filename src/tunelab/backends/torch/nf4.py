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

With the weight dequantized per call anyway, the adapter can join the base's
product for free (:data:`LORA_IN_PRODUCT`): ``[x, x·Aᵀ] @ [W, s·B]ᵀ`` is the
base output plus the adapter's in one matrix product, with the extra ``r``
columns written beside the dequantized weight.  PEFT instead writes the
adapter's full-width output ``(x·Aᵀ)·Bᵀ`` and the next kernel reads it back and
adds it: at 8B, two passes over 43,008 values a token per layer.  In backward,
``grad @ [W, s·B]`` gives the input's gradient and the adapter's in one
product too.  The sum is rounded once instead of twice.

In inductor's arithmetic neither paid on a GPU (they are correct: the
dequantization bit for bit against bitsandbytes 0.50.2 on CPUs, eager and
compiled), so :data:`LORA_IN_PRODUCT` is off and :data:`IN_GRAPH` takes only
bitsandbytes' kernels by default.  Through `tunelab train`, 8B QLoRA 2x2048
with checkpointing on an H100 (2026-12-06, one lease) ran at 10,575 tok/s with
both off, 10,487 with IN_GRAPH and 9,594 with both.  Once the training loop
stopped waiting for each step's numbers, bitsandbytes' host calls were hidden
behind the GPU's work, so moving them into the graph saved nothing.  And
concatenating B onto a freshly dequantized weight copies that weight on every
call.  They stay for GPUs whose host is slow beside the GPU, unmeasured.

A third way keeps bitsandbytes' kernels and drops only the Python around them
(:data:`BNB_KERNELS`, :mod:`nf4_kernels`): one opaque op launches them, inside the
graph with ``IN_GRAPH`` and in tunelab's own dequantizations (the replay's down
projection, tiled MLPs) without it.  Its weights are bitsandbytes' bit for bit.
That one paid where the arithmetic did not: the Python it drops is what the GPU
waited for (:data:`IN_GRAPH`), so it is on wherever it serves.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.torch import nf4_kernels
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.retype import retype

# IN_GRAPH: True puts every compiled QLoRA layer's dequantization in its graph (inductor's arithmetic
# where bitsandbytes' kernels don't serve); "bnb_kernels", the default, only where they do (CUDA with
# BNB_KERNELS and a bitsandbytes library that has them), as one opaque op.  Measured on an H100
# (session 46, 8B QLoRA 2x2048 with checkpointing, one lease): 11,335 tok/s against 9,781 with both
# off and Unsloth's 9,740; BNB_KERNELS alone, 10,721.  bench/gpu_env.sh's switches turn them off by name.
# "bnb_kernels" also leaves rows of SHORT_BELOW tokens or more out: at 1x16,384 (tiled MLP, FlashAttention 4)
# the op in the graph ran 8,660 tok/s against 8,865 with BNB_KERNELS alone (session 46, one machine, before
# the backward's call got its own site), and 8,609 against 9,032 after it (session 47, two H100 machines).
IN_GRAPH: bool | str = "bnb_kernels"
SHORT_BELOW = 16_384
LORA_IN_PRODUCT = False  # with IN_GRAPH: the adapter's B joins the base's product
# On CUDA, dequantize through bitsandbytes' own kernels behind one lean op (nf4_kernels): inside the
# compiled layer with IN_GRAPH (instead of inductor's arithmetic), and wherever tunelab's own code
# dequantizes a base (lora_parts.base_weight).  The same kernels bitsandbytes runs, less host time for each.
BNB_KERNELS = True
# On CUDA, the whole dequantization as one Triton kernel (:mod:`nf4_triton`: scales, offset and codes in one
# pass) that a compiled graph launches from its own code, in place of the lean op: no Python op per call, where
# the lean op's ~83 us of host time a call (H100 profile, session 49) is part of what a QLoRA step waits on.
# Its weights are bitsandbytes' bit for bit.  Off until timed on a GPU (bench/nf4_dequant_gpu.py, then
# bench/gpu_env.sh's switch nf4_triton through `tunelab train`).
TRITON = False


def in_graph_on(device: torch.device, longest: int | None = None) -> bool:
    """Whether a QLoRA run's compiled layers on ``device`` dequantize their NF4 weights in the graph.

    ``longest``: tokens in the run's longest row, where known (``"bnb_kernels"`` leaves long rows out).
    """
    if IN_GRAPH == "bnb_kernels":
        short = longest is None or longest < SHORT_BELOW
        kernels = takes_triton(device) or (BNB_KERNELS and nf4_kernels.load())
        return short and device.type == "cuda" and kernels
    return bool(IN_GRAPH)


def takes_triton(device: torch.device) -> bool:
    """Whether NF4 weights on ``device`` dequantize through :mod:`nf4_triton`'s kernel (:data:`TRITON`)."""
    if not TRITON or device.type != "cuda":
        return False
    from tunelab.backends.torch import nf4_triton  # imports triton: only where the switch is on

    return nf4_triton.triton is not None


def in_graph_4bit(model: Any) -> int:
    """Make the decoder layers' NF4 linears dequantize in the compiled graph; returns how many.

    Runs before the layers are compiled, like the other class-level wrappers (:mod:`retype`),
    and before the replay's lean down projection, whose wrapper must stay the outermost.
    """
    return sum(wrap_modules(layer) for layer in decoder_layers(model))


def wrap_modules(root: Any) -> int:
    """:func:`in_graph_4bit` for every module under ``root``; returns how many NF4 linears."""
    from bitsandbytes.nn import Linear4bit  # only QLoRA bases call this (PEFT's wrapper has the same name)

    count = 0
    for module in root.modules():
        if isinstance(module, Linear4bit) and supported(module.weight):
            retype(module, _InGraph4bit)
            count += 1
        elif LORA_IN_PRODUCT and hasattr(module, "lora_A") and _nf4_base(module, Linear4bit):
            retype(module, _LoraInProduct)
    return count


def _nf4_base(module: Any, linear4bit: Any) -> bool:
    base = getattr(module, "base_layer", None)
    return isinstance(base, linear4bit) and supported(base.weight)


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
        return bool(
            state.absmax.dtype == torch.uint8
            and inner.code is not None
            and inner.code.numel() == 256
            and inner.absmax.dtype == torch.float32
        )
    return bool(state.absmax.dtype == torch.float32)


def dequantize(weight: torch.Tensor, state: Any, site: int = 0) -> torch.Tensor:
    """``weight``'s values in ``state.dtype``, from its packed NF4 codes (two per byte, the high nibble first).

    On CUDA, with :data:`BNB_KERNELS`, through bitsandbytes' own kernels behind one lean op
    (:mod:`nf4_kernels`); elsewhere in torch ops, which a compiled graph fuses into one kernel.
    A backward's call passes its own ``site`` (:func:`nf4_kernels.dequantize` says why).
    """
    if takes_triton(weight.device):
        from tunelab.backends.torch import nf4_triton

        return nf4_triton.dequantize(weight, state, site)
    if takes_bnb_kernels(weight):
        return nf4_kernels.dequantize(weight, state, site)
    scales = state.absmax
    if state.nested:
        inner = state.state2
        scales = nested_scales(state.absmax, inner.code, inner.absmax, state.offset, inner.blocksize)
    return from_codes(weight, scales, state.code, state.blocksize, tuple(state.shape), state.dtype)


def takes_bnb_kernels(weight: torch.Tensor) -> bool:
    """Whether :func:`dequantize` runs bitsandbytes' kernels for ``weight``: :data:`BNB_KERNELS`, CUDA, library."""
    return BNB_KERNELS and nf4_kernels.available(weight)


def from_codes(
    packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor, blocksize: int, shape: Any, dtype: torch.dtype
) -> torch.Tensor:
    """The weight from its 4-bit codes: each looked up in ``code`` (16 values), times its block's fp32 scale."""
    flat = packed.view(torch.uint8).reshape(-1)
    codes = torch.stack((flat >> 4, flat & 15), dim=-1).reshape(-1).to(torch.int32)
    values = code[codes].view(-1, blocksize)  # fp32, one row per block
    return (values * scales[:, None]).view(tuple(shape)).to(dtype)


def nested_scales(
    absmax: torch.Tensor, code2: torch.Tensor, absmax2: torch.Tensor, offset: Any, per_group: int
) -> torch.Tensor:
    """Each block's absolute maximum in fp32 from double quantization: an 8-bit code, a scale per group, an offset."""
    looked_up = code2[absmax.to(torch.int32)]  # the 8-bit codes' values
    groups = looked_up.numel()
    if groups % per_group == 0:
        scaled = (looked_up.view(-1, per_group) * absmax2[:, None]).view(-1)
    else:  # a last, partial group
        scaled = looked_up * absmax2.repeat_interleave(per_group)[:groups]
    return scaled + offset


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
        return grad @ dequantize(weight, ctx.state, site=1).to(grad.dtype), None, None, None


class _LoraInProduct:
    """Put in front of PEFT's LoRA wrapper of an NF4 linear: in a compiled graph, B joins the base's product."""

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        name = _plain_adapter(self, x, kwargs)
        if name is None or not torch.compiler.is_compiling():
            return super().forward(x, *args, **kwargs)  # type: ignore[misc]
        module: Any = self
        base = module.get_base_layer()
        device = x.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xa = module.lora_A[name](x)  # with autograd: A trains
        bias = None if base.bias is None else base.bias.to(compute)
        lora_b, scaling = module.lora_B[name].weight, float(module.scaling[name])
        out = _Nf4LoraLinear.apply(
            x.to(compute), xa.to(compute), base.weight, base.weight.quant_state, lora_b, scaling, bias
        )
        return out.to(x.dtype)


def _plain_adapter(module: Any, x: torch.Tensor, kwargs: dict[str, Any]) -> str | None:
    """The one active plain LoRA adapter (no dropout, bias, variant, merge), whose B can join the product."""
    if module.disable_adapters or module.merged or kwargs.get("adapter_names") is not None:
        return None
    active = [name for name in module.active_adapters if name in module.lora_A]
    if len(active) != 1:
        return None
    name = active[0]
    if name in getattr(module, "lora_variant", {}) or getattr(module, "lora_bias", {}).get(name, False):
        return None
    if not isinstance(module.lora_dropout[name], torch.nn.Identity):
        return None
    # PEFT casts the input to the adapter's dtype when no autocast does: then the products differ in dtype.
    if not torch.is_autocast_enabled(x.device.type) and x.dtype != module.lora_A[name].weight.dtype:
        return None
    return str(name)


class _Nf4LoraLinear(torch.autograd.Function):
    """``[x, x·Aᵀ] @ [W, s·B]ᵀ``: the base's and the adapter's outputs in one product, ``W`` frozen NF4.

    Saved for backward: the packed weight, ``x·Aᵀ`` (``r`` values a position) and ``B``, not ``x``:
    the frozen base needs no weight gradient, and A's comes from autograd around this.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        xa: torch.Tensor,
        weight: torch.Tensor,
        state: Any,
        lora_b: torch.Tensor,
        scaling: float,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        ctx.state, ctx.scaling = state, scaling
        ctx.save_for_backward(weight, xa, lora_b)
        return torch.nn.functional.linear(
            torch.cat((x, xa), dim=-1), _with_adapter(weight, state, lora_b, scaling, x.dtype), bias
        )

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        weight, xa, lora_b = ctx.saved_tensors
        rank = lora_b.shape[1]
        both = grad @ _with_adapter(weight, ctx.state, lora_b, ctx.scaling, grad.dtype, site=1)
        scaled = (grad * ctx.scaling).reshape(-1, grad.shape[-1])  # as PEFT's backward scales it, before the product
        grad_b = scaled.t() @ xa.reshape(-1, rank).to(grad.dtype)
        return both[..., :-rank], both[..., -rank:], None, None, grad_b.to(lora_b.dtype), None, None


def _with_adapter(
    weight: torch.Tensor, state: Any, lora_b: torch.Tensor, scaling: float, dtype: torch.dtype, site: int = 0
) -> torch.Tensor:
    """``[W, s·B]``: the dequantized weight with the adapter's scaled B as ``r`` more input columns."""
    return torch.cat((dequantize(weight, state, site).to(dtype), (lora_b * scaling).to(dtype)), dim=1)
