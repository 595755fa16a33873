"""The ``onnx`` target: ``torch.onnx`` export of the merged model, run by onnxruntime.

The graph takes ``input_ids`` (batch × sequence, both dynamic) and returns
``logits``.  It is exported without KV-cache inputs: transformers 5 keeps the
cache in ``Cache`` objects that torch.onnx does not flatten into graph inputs
reliably, so generation with this graph re-reads the prompt at each step.
The tokenizer and chat template are saved beside ``model.onnx``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError
from tunelab.export.merge import Merged
from tunelab.export.pipeline import Written

MODEL_FILE = "model.onnx"


def write(folder: Path, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Export the merged model to ``out/model.onnx`` (weights inline, or in ``model.onnx.data`` when large)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    wrapper = _logits_only(merged.model).eval()
    example = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]], dtype=torch.long)  # batch 2: size 1 would be fixed
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=1 << 16)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                (example,),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: batch, 1: seq}},
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:
            raise ModelError(f"torch.onnx could not export this model ({type(exc).__name__}: {exc})") from None
    assert program is not None
    program.save(str(out / MODEL_FILE), external_data=_large(merged.model))
    merged.tokenizer.save_pretrained(str(out))
    merged.model.config.save_pretrained(str(out))
    return Written(out, "float32", lambda: ONNXRuntime(out), notes=["ONNX graph without KV-cache inputs"])


def _large(model: Any) -> bool:
    """Protobuf caps a file at 2 GB; bigger models keep their weights in an external data file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1_500_000_000


def _logits_only(model: Any) -> Any:
    """Wrap ``model`` as ``input_ids -> logits`` without a cache: the graph onnxruntime runs."""
    import torch

    class LogitsOnly(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any) -> Any:
            return self.inner(input_ids=input_ids, use_cache=False).logits

    return LogitsOnly(model)


class ONNXRuntime:
    """``model.onnx`` in an onnxruntime CPU session, with the tokenizer saved beside it."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime

        from tunelab.hub import load_tokenizer

        self.session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(folder)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def logits(self, ids: list[int]) -> np.ndarray:
        (out,) = self.session.run(["logits"], {"input_ids": np.array([ids], dtype=np.int64)})
        return np.asarray(out[0], dtype=np.float32)

    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)
