"""Samples -> token ids and labels, with prompt masking.

Each sample becomes a list of ``(text, trained)`` pieces; all pieces of a
split are tokenized in one batched call (the fast tokenizers parallelise it in
Rust) and stitched back together.  Pieces are tokenized separately, which is
exactly how the model sees them at inference: a rendered prompt followed by
tokens it generated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.data.formats import Sample
from tunelab.data.templates import chat_segments
from tunelab.errors import ModelError

IGNORE = -100


@dataclass
class TokenizedSplit:
    """Token ids and labels of one split; ``labels`` holds ``IGNORE`` where no loss is taken."""

    input_ids: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def supervised_tokens(self) -> int:
        return int(sum(int((lab[1:] != IGNORE).sum()) for lab in self.labels))


def special_prefix(tokenizer: Any) -> list[int]:
    """Ids the tokenizer puts before text on its own (usually BOS, or nothing)."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(without) + 1):
        if with_special[start : start + len(without)] == without:
            return list(with_special[:start])
    return []


def tokenize_samples(
    samples: Sequence[Sample],
    tokenizer: Any,
    *,
    template: str,
    max_seq_len: int,
    mask_prompt: bool,
    sources: Sequence[tuple[str, int]] | None = None,
) -> TokenizedSplit:
    """Tokenize samples; drop those left with no supervised token after truncation."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    prefix = special_prefix(tokenizer)
    plans: list[list[tuple[str, bool]]] = []
    for index, sample in enumerate(samples):
        where = sources[index] if sources else ("<data>", index + 1)
        plans.append(_pieces(sample, tokenizer, template, where))
    texts = [text for plan in plans for text, _ in plan]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out = TokenizedSplit()
    cursor = 0
    for sample, plan in zip(samples, plans, strict=True):
        ids: list[int] = list(prefix) if sample.kind != "chat" else []
        labels: list[int] = [IGNORE] * len(ids)
        for _text, trained in plan:
            piece = encoded[cursor]
            cursor += 1
            ids.extend(piece)
            labels.extend(piece if (trained or not mask_prompt) else [IGNORE] * len(piece))
        if sample.kind != "chat":
            ids.append(eos)
            labels.append(eos)
        if len(ids) > max_seq_len:
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            out.truncated += 1
        if all(label == IGNORE for label in labels[1:]):
            out.dropped += 1
            continue
        out.input_ids.append(np.asarray(ids, dtype=np.int32))
        out.labels.append(np.asarray(labels, dtype=np.int32))
    return out


def _pieces(sample: Sample, tokenizer: Any, template: str, where: tuple[str, int]) -> list[tuple[str, bool]]:
    if sample.kind == "text":
        return [(sample.text, True)]
    if sample.kind == "completion":
        pieces = [(sample.completion, True)]
        return [(sample.prompt, False), *pieces] if sample.prompt else pieces
    return chat_segments(tokenizer, template, sample.messages, where=where)
