"""The export regression table: the same held-out questions answered by the run and by each of its exports.

The reference is the run's own result (the base with its adapter, unmerged, in float32).  Every export
recorded on the run is loaded by the runtime that will serve it (transformers, llama.cpp, onnxruntime,
mlx-lm) and asked the same prompts, token for token: greedy answers are compared with the reference's
(agreement), scored with the eval metrics, and the reference answers' token loss gives a perplexity
ratio.  A quantised GGUF's real drop shows here, on the user's own task, not on a stock benchmark.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ConfigError
from tunelab.evaluate.examples import EvalExample
from tunelab.evaluate.metrics import Metric

SCORABLE = ("hf", "gguf", "onnx", "mlx", "gguf-adapter", "mlx-adapter")
"""Export targets whose runtime runs here (Core ML runs only on macOS); the adapter-only ones are loaded over the
run's base: mlx-lm reads the base folder, llama.cpp a GGUF of it (see :func:`open_runtime`)."""


def runtime_for(target: str, path: Path) -> Any:
    """The export at ``path`` loaded by the runtime that serves it."""
    if target == "hf":
        from tunelab.export.hf import HFRuntime

        return HFRuntime(path)
    if target == "gguf":
        from tunelab.export.gguf_runtime import GGUFRuntime

        return GGUFRuntime(path, n_ctx=1024)
    if target == "onnx":
        from tunelab.export.onnx import ONNXRuntime

        return ONNXRuntime(path)
    if target == "mlx":
        from tunelab.export.mlx import MLXRuntime

        return MLXRuntime(path)
    raise ConfigError(f"no runtime to score a {target} export with here")


@contextlib.contextmanager
def open_runtime(target: str, path: Path, *, base: Path | None = None, base_ref: str | None = None) -> Iterator[Any]:
    """The export at ``path`` in its runtime; an adapter-only export applied to ``base`` (the run's base folder).

    llama.cpp needs the base as a GGUF: the user's own file when the run started from one (``base_ref``),
    else one written for the occasion and removed afterwards.
    """
    if target.endswith("-adapter") and base is None:
        raise ConfigError(f"a {target} export is scored over the run's base, and none was given")
    if target == "mlx-adapter" and base is not None:
        from tunelab.export.mlx import MLXRuntime

        yield MLXRuntime(base, adapter=path)
    elif target == "gguf-adapter" and base is not None:
        from tunelab.export.gguf_adapter import base_gguf
        from tunelab.export.gguf_runtime import GGUFRuntime

        with base_gguf(base, base_ref=base_ref, near=path) as gguf_file:
            yield GGUFRuntime(gguf_file, n_ctx=1024, lora=path)
    else:
        yield runtime_for(target, path)


@dataclass
class Row:
    """One line of the table: a model (the reference or an export) and how it did."""

    target: str
    path: str
    scores: dict[str, float] = field(default_factory=dict)
    agreement: float = 1.0  # share of examples whose greedy answer equals the reference's, token for token
    token_loss: float = 0.0  # mean loss of the reference's answers' tokens (nats)
    perplexity_ratio: float = 1.0  # exp(token_loss - the reference's token_loss)
    answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Prompted:
    """An example as token ids: the prompt, and the reference answer's tokens (for the loss)."""

    prompt: list[int]
    answer: list[int]


def prompted(examples: Sequence[EvalExample], tokenizer: Any, *, chat: bool) -> list[Prompted]:
    """Token ids as `tunelab generate` builds them for the run's format, and each reference answer's tokens."""
    from tunelab.inference import prompt_token_ids

    out = []
    for example in examples:
        messages = list(example.messages) or [{"role": "user", "content": example.prompt}]
        prompt = prompt_token_ids(tokenizer, messages, chat=chat)
        out.append(Prompted(prompt, list(tokenizer(example.reference, add_special_tokens=False)["input_ids"])))
    return out


def score(
    runtime: Any,
    target: str,
    path: str,
    prompts: Sequence[Prompted],
    examples: Sequence[EvalExample],
    metrics: Sequence[Metric],
    decode: Callable[[list[int]], str],
    *,
    stops: Sequence[int],
    max_new_tokens: int,
    reference: Row | None = None,
    reference_tokens: list[list[int]] | None = None,
) -> tuple[Row, list[list[int]]]:
    """Greedy answers, scores, agreement with ``reference_tokens`` and the answers' token loss for one runtime."""
    tokens = [_greedy(runtime, p.prompt, stops, max_new_tokens) for p in prompts]
    answers = [decode(t) for t in tokens]
    refs = [e.reference for e in examples]
    fields = [e.fields or {} for e in examples]
    row = Row(target, path, {m.name: m.score(answers, refs, fields).value for m in metrics}, answers=answers)
    if reference_tokens is not None:
        row.agreement = sum(a == b for a, b in zip(tokens, reference_tokens, strict=True)) / max(len(tokens), 1)
    row.token_loss = _answer_loss(runtime, prompts)
    if reference is not None:
        row.perplexity_ratio = math.exp(min(row.token_loss - reference.token_loss, 50.0))
    return row, tokens


def _greedy(runtime: Any, prompt: list[int], stops: Sequence[int], max_new_tokens: int) -> list[int]:
    """Greedy tokens after ``prompt`` until a stop token (without a cache: held-out answers are short)."""
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        token = int(np.argmax(np.asarray(runtime.logits(seq))[-1]))
        if token in stops:
            break
        out.append(token)
        seq.append(token)
    return out


def _answer_loss(runtime: Any, prompts: Sequence[Prompted]) -> float:
    """Mean cross-entropy of each reference answer's tokens after its prompt."""
    total, count = 0.0, 0
    for p in prompts:
        if not p.answer:
            continue
        logits = np.asarray(runtime.logits(p.prompt + p.answer), dtype=np.float64)
        rows = logits[len(p.prompt) - 1 : len(p.prompt) - 1 + len(p.answer)]
        peak = rows.max(axis=-1, keepdims=True)
        log_z = peak[:, 0] + np.log(np.exp(rows - peak).sum(axis=-1))
        total += float((log_z - rows[np.arange(len(p.answer)), p.answer]).sum())
        count += len(p.answer)
    return total / count if count else math.nan
