"""bitsandbytes' own NF4 dequantization kernels behind one lean torch op, ``tunelab::nf4_dequantize``.

With QLoRA and checkpointing an 8B Llama step dequantizes 640 weights, each through
bitsandbytes' Python: the functional wrapper, two of its registered ops (each a
dispatch into Python, a device guard, a stream lookup, the pointers read one by one)
and the add of the scales' offset.  In an H100 profile of 8B QLoRA 2x2048 the GPU sat
40-130 µs between the kernels of each attention projection's dequantization, waiting
for the host, and the attention's own products are 44-175 µs: that half of each layer
ran at the host's pace (bench/README, session 45).

This op launches the very same kernels with the same arguments, so the weight is
bitsandbytes' bit for bit: the double-quantized scales into fp32, plus their offset,
then the 4-bit codes into the compute dtype.  What it drops is the Python around
them.  Inside a compiled layer the op is opaque (a fake returns the shape), so
inductor calls it like any extern kernel and runs the product itself.

Off CUDA, or where bitsandbytes' library lacks the entry points, the op computes the
same arithmetic in torch ops (:func:`tunelab.backends.torch.nf4.dequantize`'s), so it
has one meaning everywhere; callers route CUDA weights to it only where
:func:`available` says the kernels are there.
"""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any

import torch

_LIB = torch.library.Library("tunelab", "FRAGMENT")
_LIB.define(
    "nf4_dequantize(Tensor packed, Tensor absmax, Tensor? code2, Tensor? absmax2, Tensor? offset, "
    "Tensor code, int blocksize, int blocksize2, int[] shape, ScalarType dtype, int site=0) -> Tensor"
)
_KERNEL_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


_UNSET = object()
_lib: Any = _UNSET  # bitsandbytes' library once looked for (None: it can't serve)
_ready = False  # the answer as a plain bool: what a compiled graph's trace reads (and guards on)
_kernels: dict[torch.dtype, Any] = {}  # the 4-bit entry point for each compute dtype


def load() -> bool:
    """Look for bitsandbytes' CUDA library once, before any layer compiles; whether it serves this op.

    Called where a QLoRA run's layers are rewritten, so a compiled graph's trace only reads the answer.
    """
    global _lib, _ready
    if _lib is _UNSET:
        _lib = _find_library()
        _ready = _lib is not None
        if _lib is not None:
            _kernels.update({d: getattr(_lib, f"cdequantize_blockwise_{k}_nf4") for d, k in _KERNEL_NAMES.items()})
    return _ready


def _find_library() -> Any:
    try:
        import bitsandbytes.backends.cuda.ops  # noqa: F401  # sets the entry points' argument types
        from bitsandbytes.cextension import lib
    except Exception:  # not installed, no CUDA build, a layout this code doesn't know
        return None
    if not getattr(lib, "compiled_with_cuda", False):
        return None  # a CPU build answers every CUDA entry point with a function that raises
    names = ["cdequantize_blockwise_fp32"] + [f"cdequantize_blockwise_{k}_nf4" for k in _KERNEL_NAMES.values()]
    for name in names:
        fn = getattr(lib, name, None)
        # The signature this code passes: four pointers, block size, count, stream (bitsandbytes sets it).
        native = isinstance(fn, ctypes._CFuncPtr)  # type: ignore[attr-defined]
        if not native or len(getattr(fn, "argtypes", None) or ()) != 7:
            return None
    return lib


def available(weight: torch.Tensor) -> bool:
    """Whether ``weight`` (packed NF4) dequantizes through bitsandbytes' kernels here (after :func:`load`)."""
    return _ready and weight.device.type == "cuda"


def dequantize(weight: torch.Tensor, state: Any, site: int = 0) -> torch.Tensor:
    """``weight``'s values in ``state.dtype`` through the op (inside a compiled graph: one opaque call).

    ``site`` tells calls on the same weight apart, and the op ignores it.  A compiled graph's
    common-subexpression pass would otherwise merge a backward's dequantization into its forward's,
    and an opaque op's output is never recomputed: the layer's bf16 weights would be saved from
    forward to backward (+0.25 GiB at 8B QLoRA 2x2048 on an H100, session 46), where bitsandbytes
    holds none.  With a site of its own the backward's call stays in the backward graph.
    """
    return torch.ops.tunelab.nf4_dequantize(*op_args(weight, state, site))


def op_args(weight: torch.Tensor, state: Any, site: int = 0) -> tuple[Any, ...]:
    """The arguments of an NF4 dequantization op for ``weight`` and its bitsandbytes ``QuantState``, in order.

    Shared by this module's op and :mod:`nf4_triton`'s, whose schemas list the same arguments.
    """
    inner = state.state2 if state.nested else None
    offset = None
    if inner is not None:
        offset = state.offset
        if not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=weight.device)
    # Eagerly, the packed bytes as a plain tensor: bitsandbytes' parameter class routes every op through
    # its Python __torch_function__ (a compiled graph has already looked past it).
    packed = weight if torch.compiler.is_compiling() else weight.data
    code2, absmax2, blocksize2 = (None, None, 0) if inner is None else (inner.code, inner.absmax, int(inner.blocksize))
    head = (packed, state.absmax, code2, absmax2, offset, state.code, int(state.blocksize), blocksize2)
    return (*head, [int(n) for n in state.shape], state.dtype, site)


def _on_cuda(
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
    lib = _lib if load() else None
    if lib is None or dtype not in _kernels:
        return in_torch(packed, absmax, code2, absmax2, offset, code, blocksize, blocksize2, shape, dtype)
    # Raw pointers go to the kernels: each tensor must be on the weight's device, and the codes dense.
    # Devices are compared as indices: torch.device objects cost host time, which this step waits on.
    index = packed.get_device()
    packed = packed if packed.is_contiguous() else packed.contiguous()
    absmax = absmax if absmax.get_device() == index else absmax.to(packed.device)
    current = index == torch.cuda.current_device()  # the usual case: no device guard to enter and leave
    with contextlib.nullcontext() if current else torch.cuda.device(index):
        return _launch(lib, packed, absmax, code2, absmax2, offset, blocksize, blocksize2, shape, dtype)


def _launch(
    lib: Any,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code2: torch.Tensor | None,
    absmax2: torch.Tensor | None,
    offset: torch.Tensor | None,
    blocksize: int,
    blocksize2: int,
    shape: list[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The two kernels on the current stream of the weight's (current) device, as bitsandbytes launches them."""
    device, index = packed.device, packed.get_device()
    stream = _raw_stream(index)
    scales = absmax
    if code2 is not None:
        assert absmax2 is not None and offset is not None
        code2, absmax2, offset = (t if t.get_device() == index else t.to(device) for t in (code2, absmax2, offset))
        scales = torch.empty(absmax.shape, dtype=torch.float32, device=device)
        lib.cdequantize_blockwise_fp32(
            code2.data_ptr(), absmax.data_ptr(), absmax2.data_ptr(), scales.data_ptr(),
            blocksize2, absmax.numel(), stream,
        )  # fmt: skip
        scales.add_(offset)
    out = torch.empty(shape, dtype=dtype, device=device)
    _kernels[dtype](None, packed.data_ptr(), scales.data_ptr(), out.data_ptr(), blocksize, out.numel(), stream)
    return out


def _raw_stream(index: int) -> int:
    """The handle of the current CUDA stream on device ``index``, without building a ``torch.cuda.Stream``.

    torch's private binding (the one inductor's generated code calls for the same thing) where present;
    else the public API.
    """
    raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    return int(raw(index)) if raw is not None else int(torch.cuda.current_stream(index).cuda_stream)


def in_torch(*parts: Any) -> torch.Tensor:
    """The op off CUDA: the same arithmetic in torch ops (``parts`` as the op's schema lists them)."""
    from tunelab.backends.torch import nf4

    packed, absmax, code2, absmax2, offset, code, blocksize, blocksize2, shape, dtype = parts[:10]
    scales = absmax
    if code2 is not None:
        scales = nf4.nested_scales(absmax, code2, absmax2, offset, blocksize2)
    return nf4.from_codes(packed, scales, code, blocksize, shape, dtype)


def fake(packed: torch.Tensor, *parts: Any) -> torch.Tensor:
    """What a compiled graph's trace sees: a new tensor of the weight's shape (``parts[7]``) and dtype."""
    return packed.new_empty(parts[7], dtype=parts[8])


_LIB.impl("nf4_dequantize", _on_cuda, "CUDA")
_LIB.impl("nf4_dequantize", in_torch, "CPU")
torch.library.register_fake("tunelab::nf4_dequantize", fake, lib=_LIB)
