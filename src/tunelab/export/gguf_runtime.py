"""A GGUF file as llama.cpp (through llama-cpp-python) loads and runs it: what verifies an export."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError

_PARAMS_LOCK = threading.Lock()


@contextlib.contextmanager
def _plain_cpu_buffers() -> Iterator[None]:
    """Load with llama.cpp's plain CPU weight buffers, not its "extra" (repacked / AMX) ones.

    On CPUs with AMX (Intel Sapphire Rapids and later), llama.cpp 0.3.36's AMX matmul
    segfaults on q8_0/q4_0 tensors of small models; the repacked layouts are only a speed-up,
    so verification uses the reference layout, which computes the same logits.
    llama-cpp-python's ``Llama`` has no argument for ``use_extra_bufts``, so its defaults are
    adjusted while the model loads (under a lock: two loads at once must not race on it).
    """
    import llama_cpp.llama as llama_module

    low = llama_module.llama_cpp
    default = low.llama_model_default_params

    def params() -> Any:
        value = default()
        if hasattr(value, "use_extra_bufts"):
            value.use_extra_bufts = False
        return value

    with _PARAMS_LOCK:
        low.llama_model_default_params = params
        try:
            yield
        finally:
            low.llama_model_default_params = default


class GGUFRuntime:
    """The GGUF file as llama.cpp (through llama-cpp-python) loads and runs it."""

    def __init__(self, path: Path, *, n_ctx: int = 512, lora: Path | None = None) -> None:
        """Load ``path``; with ``lora``, a LoRA adapter GGUF applied to it at scale 1 (as Ollama's ADAPTER)."""
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ModelError(
                "verifying a GGUF export needs llama-cpp-python", hint='pip install "tunelab[gguf]", or --no-verify'
            ) from None
        with _plain_cpu_buffers():
            self.llm = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                logits_all=True,
                verbose=False,
                n_threads=2,
                lora_path=str(lora) if lora is not None else None,
            )

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special, special=True))

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)

    def chat_template(self) -> str | None:
        return self.llm.metadata.get("tokenizer.chat_template")
