"""The ``mlx`` target: an mlx-lm folder (optionally 4/8-bit), written by ``tunelab.convert``.

Verification loads it with ``mlx_lm.load``, the way LM Studio and mlx-lm users
will, and compares its logits with the merged model's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.export.merge import Merged
from tunelab.export.pipeline import Written


def write(folder: Path, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Convert the merged HF folder to mlx-lm's layout at ``out``."""
    from tunelab.convert import convert_checkpoint

    bits = int(quantize) if quantize else None
    result = convert_checkpoint(str(folder), out, to="mlx", bits=bits)
    precision = f"{bits}bit" if bits else (result.dtype or merged.save_dtype)
    notes = [f"MLX affine {bits}-bit, group size {result.group_size}"] if bits else []
    return Written(out, precision, lambda: MLXRuntime(out), notes=[*notes, *result.notes])


class MLXRuntime:
    """The folder as ``mlx_lm.load`` gives it; with ``adapter``, the base with an mlx-lm adapter applied
    (``mlx_lm.load(base, adapter_path=...)``, as the ``mlx-adapter`` export is checked)."""

    def __init__(self, folder: Path, adapter: Path | None = None) -> None:
        from tunelab.backends.mlx.blas import ensure_fast_blas

        ensure_fast_blas()
        from mlx_lm import load

        if adapter is None:
            loaded: Any = load(str(folder))
        else:
            from tunelab.backends.mlx.hf_config import rope_fixes

            # A config.json written by transformers 5 keeps rope_theta where mlx-lm doesn't look (see rope_fixes).
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            loaded = load(str(folder), adapter_path=str(adapter), model_config=rope_fixes(config))
        self.model, self.tokenizer = loaded[0], loaded[1]

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer._tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def logits(self, ids: list[int]) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array([ids]))[0].astype(mx.float32)
        return np.array(out)

    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)
