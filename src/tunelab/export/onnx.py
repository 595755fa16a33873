"""The ``onnx`` target: ``torch.onnx`` export of the merged model with KV-cache inputs, run by onnxruntime.

Graph inputs: ``input_ids`` (batch × new tokens), ``past_keys`` and
``past_values`` (layers × batch × kv_heads × past × head_dim; ``past`` may be
0 for the first call).  Outputs: ``logits`` for the new tokens and
``present_keys`` / ``present_values`` to feed back.  Positions continue from
the past length, so rows of a batch must not be left-padded.  The tokenizer,
chat template and config are saved beside ``model.onnx``.

Verification runs the prompt in one call and the greedy continuation one token
at a time through the cache, so both paths are compared with the merged model.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError
from tunelab.export.merge import Merged
from tunelab.export.pipeline import Written
from tunelab.hub import save_tokenizer

MODEL_FILE = "model.onnx"
INPUTS: tuple[str, ...] = ("input_ids", "past_keys", "past_values")
OUTPUTS: tuple[str, ...] = ("logits", "present_keys", "present_values")
CACHED_STEPS = 8  # verification feeds the last tokens one at a time through the cache


def write(folder: Path, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Export the merged model to ``out/model.onnx`` (weights in ``model.onnx.data`` when large)."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    wrapper = _with_cache(merged.model).eval()
    layers, heads, head_dim = cache_shape(merged.model.config)
    # Batch 2 and past 3 as examples: torch.export would fix a dimension whose example size is 0 or 1.
    example = (torch.tensor([[1, 2], [3, 4]]), *(torch.zeros(layers, 2, heads, 3, head_dim) for _ in range(2)))
    batch, seq, past = (torch.export.Dim(n, max=1 << 16) for n in ("batch", "sequence", "past"))
    dims = {"input_ids": {0: batch, 1: seq}, "past_keys": {1: batch, 3: past}, "past_values": {1: batch, 3: past}}
    with warnings.catch_warnings(), torch.no_grad(), _quiet_registry():
        warnings.simplefilter("ignore")
        try:
            program = torch.onnx.export(
                wrapper,
                example,
                input_names=list(INPUTS),
                output_names=list(OUTPUTS),
                dynamic_shapes=dims,
                dynamo=True,
                verbose=False,
            )
        except Exception as exc:
            raise ModelError(f"torch.onnx could not export this model ({type(exc).__name__}: {exc})") from None
    assert program is not None
    program.save(str(out / MODEL_FILE), external_data=_large(merged.model))
    save_tokenizer(merged.tokenizer, out)  # keeps the SentencePiece legacy flag
    merged.model.config.save_pretrained(str(out))
    return Written(out, "float32", lambda: ONNXRuntime(out))


@contextlib.contextmanager
def _quiet_registry() -> Iterator[None]:
    """torch.onnx logs a warning per torchvision operator it can't register when torchvision is missing:
    noise a language model's export can't act on, so its registry logger says only errors meanwhile."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def cache_shape(config: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the cache tensors."""
    text = config.get_text_config()
    heads = int(text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
    return int(text.num_hidden_layers), int(text.num_key_value_heads or heads), head_dim


def _large(model: Any) -> bool:
    """Protobuf caps a file at 2 GB; bigger models keep their weights in an external data file."""
    return sum(p.numel() * p.element_size() for p in model.parameters()) > 1_500_000_000


def _with_cache(model: Any) -> Any:
    """Wrap ``model`` as ``(input_ids, past_keys, past_values) -> (logits, present_keys, present_values)``."""
    import torch
    from transformers import DynamicCache

    layers = cache_shape(model.config)[0]

    class WithCache(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, past_keys: Any, past_values: Any) -> Any:
            cache = DynamicCache(config=self.inner.config)
            for i in range(layers):
                cache.update(past_keys[i], past_values[i], i)
            past, new = past_keys.shape[3], input_ids.shape[1]
            positions = (torch.arange(new) + past)[None].expand(input_ids.shape[0], -1)
            mask = torch.ones(input_ids.shape[0], past + new, dtype=torch.long)
            out = self.inner(
                input_ids=input_ids, past_key_values=cache, position_ids=positions, attention_mask=mask, use_cache=True
            )
            kv = out.past_key_values
            keys = torch.stack([kv.layers[i].keys for i in range(layers)])
            values = torch.stack([kv.layers[i].values for i in range(layers)])
            return out.logits, keys, values

    return WithCache(model)


class ONNXRuntime:
    """``model.onnx`` in an onnxruntime CPU session, with the tokenizer saved beside it."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime
        from transformers import AutoConfig

        from tunelab.hub import load_tokenizer

        self.session = onnxruntime.InferenceSession(str(folder / MODEL_FILE), providers=["CPUExecutionProvider"])
        self.tokenizer = load_tokenizer(folder)
        self.layers, self.heads, self.head_dim = cache_shape(AutoConfig.from_pretrained(str(folder)))

    def step(self, ids: list[int], past: tuple[np.ndarray, np.ndarray] | None) -> tuple[np.ndarray, Any]:
        """Logits for ``ids`` after ``past`` (None: an empty cache), and the cache that follows."""
        if past is None:
            empty = np.zeros((self.layers, 1, self.heads, 0, self.head_dim), dtype=np.float32)
            past = (empty, empty)
        feed = {"input_ids": np.array([ids], dtype=np.int64), "past_keys": past[0], "past_values": past[1]}
        logits, keys, values = self.session.run(list(OUTPUTS), feed)
        return np.asarray(logits[0], dtype=np.float32), (keys, values)

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def logits(self, ids: list[int]) -> np.ndarray:
        """The head in one call, then the last ``CACHED_STEPS`` tokens one by one through the cache."""
        split = max(1, len(ids) - CACHED_STEPS)
        out, past = self.step(ids[:split], None)
        rows = [out]
        for token in ids[split:]:
            row, past = self.step([token], past)
            rows.append(row)
        return np.concatenate(rows)

    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)
