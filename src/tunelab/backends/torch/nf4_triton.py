"""NF4 dequantization in one Triton kernel, ``tunelab::nf4_dequantize_triton``, which a compiled graph launches itself.

:mod:`nf4_kernels`' op drops bitsandbytes' Python wrapper but still spends ~83 µs of host Python a call
(an H100 profile): the op's dispatch into Python, two ctypes launches, two allocations and the add of the
scales' offset, 640 times an 8B QLoRA step, and that step waits on the host.  Here the whole arithmetic
(the double-quantized scales, their offset, the 4-bit codes) is one kernel: one launch, one allocation.
It is registered with ``torch.library.triton_op``, so inside a compiled graph the op decomposes into the
kernel itself and inductor launches it from its generated code, with no Python op per call.

Its values are bitsandbytes' bit for bit (the arithmetic of :func:`nf4.nested_scales` and
:func:`nf4.from_codes`).  Nothing routes weights here yet: it stays off until timed on a GPU
(``bench/nf4_dequant_gpu.py``).

One function is the op everywhere: the kernel for CUDA tensors where triton imports, else the torch
arithmetic.  With triton it is a ``triton_op`` (the function is its fake too; the CPU kernel is the torch
arithmetic); without, a plain ``custom_op`` with a fake, so callers never break on machines without triton.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from tunelab.backends.torch import nf4_kernels

try:
    import triton
    import triton.language as tl
except Exception:  # not installed, or a build that doesn't load: the op is the torch arithmetic
    triton = None  # type: ignore[assignment]

NAME = "tunelab::nf4_dequantize_triton"
BLOCK_BYTES = 2048  # packed bytes a program reads (4,096 values written); untuned
NUM_WARPS = 4  # untuned
# Under Triton's interpreter (numpy on the CPU, for tests) the kernel takes the INTERPRETED paths below.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


if triton is not None:

    @triton.jit
    def _kernel(
        packed_ptr, absmax_ptr, code2_ptr, absmax2_ptr, offset_ptr, code_ptr, out_ptr, n, site,
        HALF: tl.constexpr, ROWS: tl.constexpr, BLOCKSIZE2: tl.constexpr, NESTED: tl.constexpr,
        INTERPRETED: tl.constexpr,
    ):  # fmt: skip
        """ROWS quantization blocks a program, each HALF bytes in (a block's 2·HALF values out).

        ``site`` is unused: it keeps a backward's launch apart from its forward's in a compiled graph.
        """
        block = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        in_range = block < n // (2 * HALF)  # whole blocks only: masks along rows keep the loads wide
        byte = block[:, None] * HALF + tl.arange(0, HALF)[None, :]
        packed = tl.load(packed_ptr + byte, mask=in_range[:, None], other=0)
        if NESTED:  # each block's scale: an 8-bit code's value times its group's scale, then plus the offset
            looked_up = tl.load(code2_ptr + tl.load(absmax_ptr + block, mask=in_range, other=0).to(tl.int32))
            group = tl.load(absmax2_ptr + block // BLOCKSIZE2, mask=in_range, other=0.0)
            if INTERPRETED:  # numpy contracts nothing (and the interpreter runs no inline assembly)
                scaled = looked_up * group
            else:
                # The compiler may contract a multiply and the add after it into one fused multiply-add (one
                # rounding), where bitsandbytes rounds the product to fp32 before adding the offset.  An
                # explicitly rounded multiply (PTX mul.rn) is never contracted.
                scaled = tl.inline_asm_elementwise(
                    "mul.rn.f32 $0, $1, $2;", "=r,r,r", [looked_up, group], dtype=tl.float32, is_pure=True, pack=1
                )
            scale = scaled + tl.load(offset_ptr)
        else:
            scale = tl.load(absmax_ptr + block, mask=in_range, other=0.0)
        high = tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale[:, None]  # the byte's first value
        low = tl.load(code_ptr + (packed & 15).to(tl.int32)) * scale[:, None]
        kind = out_ptr.dtype.element_ty
        # (ROWS, 2·HALF), each byte's two values side by side: the stores are in order and coalesce
        values = tl.interleave(_rounded(high, kind, INTERPRETED), _rounded(low, kind, INTERPRETED))
        index = block[:, None] * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        tl.store(out_ptr + index, values, mask=in_range[:, None])

    @triton.jit
    def _rounded(x, kind: tl.constexpr, INTERPRETED: tl.constexpr):
        """``x`` (fp32) to ``kind``, to nearest even: on a GPU one conversion instruction (cvt.rn)."""
        if INTERPRETED and kind == tl.bfloat16:  # the interpreter's bf16 conversion rounds ties up
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)  # rounds to nearest even at bit 16
            return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return x.to(kind)


def available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (packed NF4) would dequantize through the Triton kernel: triton imports, CUDA weight."""
    return triton is not None and weight.device.type == "cuda"


def runs_kernel(blocksize: int, numel: int) -> bool:
    """Whether the kernel takes these blocks: whole ones, of a power of two from 2 (bitsandbytes': 32 to 4,096)."""
    return triton is not None and blocksize >= 2 and blocksize & (blocksize - 1) == 0 and numel % blocksize == 0


def run_kernel(*parts: Any) -> torch.Tensor:
    """The kernel on the op's arguments (CUDA tensors; CPU ones under ``TRITON_INTERPRET=1``)."""
    packed, (blocksize, blocksize2, shape, dtype) = parts[0], parts[6:10]
    site = int(parts[10]) if len(parts) > 10 else 0
    device = packed.device
    # Pointers go to the kernel: the codes dense, every tensor on the weight's device (as bitsandbytes keeps them).
    packed = (packed if packed.is_contiguous() else packed.contiguous()).view(torch.uint8)  # bytes, any storage
    absmax, code2, absmax2, offset, code = (t if t is None or t.device == device else t.to(device) for t in parts[1:6])
    out = torch.empty(shape, dtype=dtype, device=device)
    nested = code2 is not None
    half = blocksize // 2
    rows = max(1, BLOCK_BYTES // half)
    kernel = _kernel if _INTERPRET else torch.library.wrap_triton(_kernel)  # wrap_triton: traceable launch
    kernel[(triton.cdiv(triton.cdiv(out.numel(), blocksize), rows),)](
        packed, absmax, code2 if nested else absmax, absmax2 if nested else absmax, offset if nested else absmax,
        code, out, out.numel(), site,
        HALF=half, ROWS=rows, BLOCKSIZE2=max(1, blocksize2), NESTED=nested,
        INTERPRETED=_INTERPRET, num_warps=NUM_WARPS,
    )  # fmt: skip
    return out


def _dequantize(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    code: torch.Tensor,
    blocksize: int,
    blocksize2: int,
    shape: list[int],
    dtype: torch.dtype,
    site: int = 0,
) -> torch.Tensor:
    """The op (schema as ``tunelab::nf4_dequantize``'s): the kernel for CUDA tensors, else the torch arithmetic.

    Also the op's fake and what a compiled graph's trace decomposes it into, so only torch ops and the
    wrapped kernel may run here.
    """
    parts = (packed, absmax, code2, absmax2, offset, code, blocksize, blocksize2, shape, dtype, site)
    if packed.device.type == "cuda" and runs_kernel(blocksize, math.prod(shape)):
        return run_kernel(*parts)
    return nf4_kernels.in_torch(*parts)


# The schema is inferred from _dequantize's annotations (triton_op takes no other): its ints are SymInts.
if triton is not None:
    torch.library.triton_op(NAME, _dequantize, mutates_args=())
    torch.library.register_kernel(NAME, "cpu", nf4_kernels.in_torch)
else:  # the same op without the kernel: opaque in a compiled graph, so it needs a fake
    torch.library.custom_op(NAME, _dequantize, mutates_args=())
    torch.library.register_fake(NAME, nf4_kernels.fake)  # the same schema, so the same fake


def dequantize(weight: torch.Tensor, state: Any, site: int = 0) -> torch.Tensor:
    """``weight``'s values in ``state.dtype`` through the op; as :func:`nf4_kernels.dequantize` (which says
    why ``site`` exists: here it reaches the kernel's launch, so a compiled graph keeps two calls apart)."""
    return torch.ops.tunelab.nf4_dequantize_triton(*nf4_kernels.op_args(weight, state, site))
