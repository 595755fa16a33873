"""SiLU·up with its backward as one plain Triton kernel, for the MLPs of compiled layers on CUDA.

In 8B LoRA's step on an H100 the compiled layer's SiLU·up backward (inductor's
kernel for autograd's decomposition) took 8.7 ms of ~255: 272 us a layer for
the 587 MB it must move (gate, up and the output's gradient in, the two input
gradients out, 4,096 × 14,336 bf16 each), ~2.2 TB/s, where the forward's kernel
moves its bytes at ~3.2 TB/s.  Here the forward stays the compiler's (it fuses
well) and the backward is an opaque op, ``tunelab::swiglu_backward``, whose CUDA
implementation is a single streaming kernel: three loads, fp32 arithmetic, two
stores.  Elsewhere the op is the same arithmetic in torch.

Off (:data:`ON`) until ``bench/swiglu_backward_gpu.py`` and an A/B through
``tunelab train`` on a GPU say it pays (``bench/gpu_env.sh``'s switch
``swiglu_kernel``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.retype import retype

# True: the MLPs of compiled layers on CUDA take the fused backward; False: autograd's own.
ON = False
# Elements per Triton program, and its warps (bench/swiglu_backward_gpu.py times a few).
BLOCK = 2048
WARPS = 8


def _math(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    g = gate.float()
    s = torch.sigmoid(g)
    dh = grad.float()
    return (dh * up.float() * s * (1.0 + g * (1.0 - s))).to(gate.dtype), (dh * g * s).to(up.dtype)


@torch.library.custom_op("tunelab::swiglu_backward", mutates_args=())
def swiglu_backward(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(d/d gate, d/d up)`` of ``silu(gate) * up`` for the output's gradient ``grad``."""
    return _math(gate, up, grad)


@swiglu_backward.register_fake
def _(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(gate), torch.empty_like(up)


_KERNEL: Any = None


def _kernel() -> Any:
    """The Triton kernel, built on first use (Triton is imported only on CUDA machines)."""
    global _KERNEL
    if _KERNEL is None:
        import triton.language as tl
        from triton import jit

        @jit
        def kernel(g_ptr, u_ptr, dh_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
            u = tl.load(u_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
            dh = tl.load(dh_ptr + offs, mask=mask, eviction_policy="evict_first").to(tl.float32)
            s = tl.sigmoid(g)
            tl.store(du_ptr + offs, (dh * g * s).to(du_ptr.dtype.element_ty), mask=mask)
            tl.store(dg_ptr + offs, (dh * u * s * (1.0 + g * (1.0 - s))).to(dg_ptr.dtype.element_ty), mask=mask)

        _KERNEL = kernel
    return _KERNEL


@swiglu_backward.register_kernel("cuda")
def _(gate: torch.Tensor, up: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up, grad = gate.contiguous(), up.contiguous(), grad.contiguous()
    dg, du = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    _kernel()[(-(-n // BLOCK),)](gate, up, grad, dg, du, n, BLOCK=BLOCK, num_warps=WARPS)
    return dg, du


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        return swiglu_backward(gate, up, grad)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` whose backward is :func:`swiglu_backward`."""
    return _SwiGLU.apply(gate, up)


class _FusedBackward:
    """A gated MLP whose SiLU·up backward is :func:`swiglu_backward` (the projections are its own)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp: Any = self
        return mlp.down_proj(swiglu(mlp.gate_proj(x), mlp.up_proj(x)))


def _plain_silu_mlp(mlp: Any) -> bool:
    """A transformers gated MLP with SiLU, whose forward is still the library's own (not tiled or kept)."""
    names = ("gate_proj", "up_proj", "down_proj", "act_fn")
    if mlp is None or not all(hasattr(mlp, n) for n in names):
        return False
    if not type(mlp).forward.__module__.startswith("transformers."):
        return False
    # By what it computes: transformers names its SiLU class differently across versions.
    probe = torch.linspace(-6.0, 6.0, 13)
    try:
        with torch.no_grad():
            return bool(torch.allclose(mlp.act_fn(probe), F.silu(probe)))
    except Exception:  # an activation that can't take a plain CPU tensor is no plain SiLU
        return False


def fuse_backward(model: Any) -> int:
    """Give each decoder layer's plain SiLU MLP the fused backward; returns how many."""
    count = 0
    for layer in decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if _plain_silu_mlp(mlp):
            retype(mlp, _FusedBackward)
            count += 1
    return count
