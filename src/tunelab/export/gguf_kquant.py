"""K-quants (q2_k … q6_k) through llama.cpp's own quantizer, from tunelab's f16/bf16 GGUF.

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
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator
from pathlib import Path

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
K_BLOCK = 256  # weights per K-quant super-block: a row must be a multiple of this
_K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_K")


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


def quantize_file(src: Path, out: Path, quant: str, *, threads: int | None = None) -> list[str]:
    """Quantize the float GGUF ``src`` to ``quant`` at ``out``; return notes on the tensors' types."""
    try:
        import llama_cpp
    except ImportError:
        raise ModelError(
            "K-quant GGUF exports use llama.cpp's quantizer, from llama-cpp-python",
            hint='pip install "tunelab[export]", or use --quantize q8_0 / q4_0',
        ) from None
    if quant not in KQUANTS:
        raise ModelError(f"{quant!r} is not a K-quant type ({', '.join(KQUANTS)})")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{KQUANTS[quant][0]}")
    params.nthread = threads or max(1, min(os.cpu_count() or 1, 8))
    with _quiet_llama_cpp():
        status = llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        out.unlink(missing_ok=True)
        raise ModelError(
            f"llama.cpp's quantizer failed on {src.name} for {quant} (status {status})",
            hint="export with --quantize f16 and quantize it with llama.cpp's llama-quantize to see its log",
        )
    return mix_notes(out, quant)


def tensor_types(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor of a GGUF file: its GGML type name and its shape (row length first, as GGUF stores it)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {t.name: (t.tensor_type.name, tuple(int(n) for n in t.shape)) for t in reader.tensors}


def mix_notes(path: Path, quant: str) -> list[str]:
    """What the file holds besides ``quant``'s main type: llama.cpp's mix, and rows too short for K blocks."""
    main = KQUANTS[quant][1]
    mix: dict[str, list[str]] = {}
    fallback: list[str] = []
    for name, (kind, shape) in tensor_types(path).items():
        if len(shape) < 2 or kind == main or kind == "F32":
            continue
        if shape[0] % K_BLOCK:
            fallback.append(f"{name} ({kind}: rows of {shape[0]} are not a multiple of {K_BLOCK})")
        else:
            mix.setdefault(kind, []).append(name)
    notes = [f"{quant}: most matrices are {main} (llama.cpp's quantizer)"]
    for kind, names in sorted(mix.items()):
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        notes.append(f"llama.cpp's {quant} mix keeps {len(names)} tensor(s) at {kind}: {shown}")
    if fallback:
        notes.append(f"{len(fallback)} tensor(s) fell back to a non-K type: " + "; ".join(fallback))
    return notes


def is_k_type(kind: str) -> bool:
    """Whether a GGML type name is one of the K-quant block types."""
    return kind in _K_TYPES
