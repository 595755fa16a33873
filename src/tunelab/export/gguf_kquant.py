"""K-quants (q2_k … q6_k) and i-quants (iq4_xs … iq1_s) through llama.cpp's own quantizer, from tunelab's float GGUF.

The ``gguf`` package can't write K-quant blocks, and reimplementing llama.cpp's
per-tensor mixes (q4_k_m keeps some ``attn_v``/``ffn_down`` tensors at q6_k,
the output layer at q6_k, …) would drift from what Ollama users expect of a
"Q4_K_M" file.  So tunelab writes its float GGUF as usual and hands it to
``llama_model_quantize`` from the llama.cpp library that llama-cpp-python
already built: one pass, tensor by tensor, no separate ``llama-quantize``
binary to download or compile.

K-quant blocks hold 256 weights, so a tensor whose rows are not a multiple of
256 can't be K-quantized; llama.cpp falls back to a legacy type (q5_0, q8_0,
…) for it.  :func:`mix_notes` reads the written file back and says which
tensors did not get the requested type, and why.

The i-quants (iq4_xs … iq1_s) go through the same call.  They and the K types
use an importance matrix when one is given (:mod:`.imatrix`): llama-cpp-python
exposes it as an array of ``llama_model_imatrix_data`` (name, values, count)
ending with a NULL name, which llama.cpp copies into its own map before
quantizing.  The types below ~3 bits (iq3_xxs, iq2_*, iq1_*) need one: llama.cpp
refuses them without, and so does :func:`needs_imatrix` before anything loads.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError

# --quantize value -> (llama_ftype suffix, the GGML type most matrices get)
KQUANTS: dict[str, tuple[str, str]] = {
    "q2_k": ("Q2_K", "Q2_K"),
    "q3_k_m": ("Q3_K_M", "Q3_K"),
    "q4_k_s": ("Q4_K_S", "Q4_K"),
    "q4_k_m": ("Q4_K_M", "Q4_K"),
    "q5_k_s": ("Q5_K_S", "Q5_K"),
    "q5_k_m": ("Q5_K_M", "Q5_K"),
    "q6_k": ("Q6_K", "Q6_K"),
}
# i-quants: (llama_ftype suffix, the GGML type the mix is named after), as llama.cpp's llama_ftype_get_default_type
IQUANTS: dict[str, tuple[str, str]] = {
    "iq4_xs": ("IQ4_XS", "IQ4_XS"),
    "iq4_nl": ("IQ4_NL", "IQ4_NL"),
    "iq3_m": ("IQ3_M", "IQ3_S"),
    "iq3_s": ("IQ3_S", "IQ3_S"),
    "iq3_xs": ("IQ3_XS", "IQ3_S"),
    "iq3_xxs": ("IQ3_XXS", "IQ3_XXS"),
    "iq2_m": ("IQ2_M", "IQ2_S"),
    "iq2_s": ("IQ2_S", "IQ2_XS"),
    "iq2_xs": ("IQ2_XS", "IQ2_XS"),
    "iq2_xxs": ("IQ2_XXS", "IQ2_XXS"),
    "iq1_m": ("IQ1_M", "IQ1_M"),
    "iq1_s": ("IQ1_S", "IQ1_S"),
}
LLAMA_QUANTS: dict[str, tuple[str, str]] = {**KQUANTS, **IQUANTS}
# Types llama.cpp won't write without an importance matrix ("the result will be garbage"): their main GGML type,
# or (iq3_xs) part of their mix, is one of IQ3_XXS, IQ2_*, IQ1_*.
NEED_IMATRIX = ("iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
K_BLOCK = 256  # weights per K-quant super-block: a row must be a multiple of this
_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")
_I_TYPES = ("IQ4_XS", "IQ4_NL", "IQ3_S", "IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


@contextlib.contextmanager
def _quiet_llama_cpp() -> Iterator[None]:
    """llama.cpp logs every tensor it quantizes; keep errors only (llama-cpp-python's own logger)."""
    from llama_cpp import _logger

    before = _logger.logger.level
    _logger.logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        _logger.logger.setLevel(before)


def needs_imatrix(quant: str) -> bool:
    """Whether llama.cpp refuses ``quant`` without an importance matrix."""
    return quant in NEED_IMATRIX


def quantize_file(
    src: Path,
    out: Path,
    quant: str,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    threads: int | None = None,
) -> list[str]:
    """Quantize the float GGUF ``src`` to ``quant`` at ``out``; return notes on the tensors' types.

    ``imatrix``: GGUF weight name -> mean squared input per column (:meth:`.imatrix.Imatrix.means`).
    """
    try:
        import llama_cpp
    except ImportError:
        raise ModelError(
            "K- and i-quant GGUF exports use llama.cpp's quantizer, from llama-cpp-python",
            hint='pip install "tunelab[export]", or use --quantize q8_0 / q4_0',
        ) from None
    if quant not in LLAMA_QUANTS:
        raise ModelError(f"{quant!r} is not a llama.cpp quantizer type ({', '.join(LLAMA_QUANTS)})")
    if needs_imatrix(quant) and not imatrix:
        raise ModelError(f"{quant} needs an importance matrix", hint="add --imatrix auto, or --imatrix FILE")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{LLAMA_QUANTS[quant][0]}")
    params.nthread = threads or max(1, min(os.cpu_count() or 1, 8))
    keep = _imatrix_array(llama_cpp, imatrix) if imatrix else None
    if keep is not None:
        params.imatrix = ctypes.cast(keep[0], ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    with _quiet_llama_cpp():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        out.unlink(missing_ok=True)
        raise ModelError(
            f"llama.cpp's quantizer failed on {src.name} for {quant} (status {status}; its log is above)",
            hint="export with --quantize f16 and quantize it with llama.cpp's llama-quantize to see its log",
        )
    return mix_notes(out, quant)


def _imatrix_array(llama_cpp: Any, imatrix: Mapping[str, np.ndarray]) -> tuple[Any, list[Any]]:
    """The C array llama.cpp reads (one entry per tensor, then a NULL name), and the buffers it points into.

    The caller holds the returned tuple until llama_model_quantize returns: ctypes
    doesn't keep the numpy buffers alive through the raw pointers.
    """
    entry = llama_cpp.llama_model_imatrix_data
    values = [np.ascontiguousarray(v, dtype=np.float32) for v in imatrix.values()]
    array = (entry * (len(values) + 1))()
    for slot, name, data in zip(array, imatrix, values, strict=False):
        slot.name = name.encode()
        slot.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        slot.size = data.size
    array[len(values)].name = None
    return array, values


def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor of a GGUF file: its GGML type name and its shape (row length first, as GGUF stores it)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in reader.tensors}


def mix_notes(path: Path, quant: str) -> list[str]:
    """What the file holds besides ``quant``'s main type: llama.cpp's mix, and rows too short for K blocks."""
    main = LLAMA_QUANTS[quant][1]
    mix: dict[str, list[str]] = {}
    fallback: list[str] = []
    matrices = {name: (kind, shape) for name, (kind, shape) in tensor_types(path).items() if len(shape) >= 2}
    for name, (kind, shape) in matrices.items():
        if kind == main or kind == "F32":
            continue
        if shape[0] % K_BLOCK:
            fallback.append(f"{name} ({kind}: rows of {shape[0]} are not a multiple of {K_BLOCK})")
        else:
            mix.setdefault(kind, []).append(name)
    count = sum(kind == main for kind, _shape in matrices.values())
    share = "most matrices are" if 2 * count >= len(matrices) else f"{count} of {len(matrices)} matrices are"
    notes = [f"{quant}: {share} {main} (llama.cpp's quantizer)"]
    for kind, names in sorted(mix.items()):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        notes.append(f"llama.cpp's {quant} mix keeps {len(names)} tensor(s) at {kind}: {shown}")
    if fallback:
        kind = "i-quant" if quant in IQUANTS else "K"
        notes.append(f"{len(fallback)} tensor(s) fell back to a non-{kind} type: " + "; ".join(fallback))
    return notes


def is_k_type(kind: str) -> bool:
    """Whether a GGML type name is one of the K-quant block types."""
    return kind in _K_TYPES


def is_i_type(kind: str) -> bool:
    """Whether a GGML type name is one of the i-quant block types."""
    return kind in _I_TYPES
