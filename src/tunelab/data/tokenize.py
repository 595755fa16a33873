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
from tunelab.data.templates import TemplateLacksTools, chat_segments, needs_builtin, render
from tunelab.errors import ConfigError, ModelError
from tunelab.vocab import IGNORE, ROLE_CHOSEN, ROLE_DESIRABLE, ROLE_REJECTED, ROLE_UNDESIRABLE, TRAIN_ON


@dataclass
class TokenizedSplit:
    """Token ids and labels of one split; ``labels`` holds ``IGNORE`` where no loss is taken.

    ``input_ids[i]`` and ``labels[i]`` are 1-D int arrays.  The rows are either
    lists in memory or lazy views into a memory-mapped Arrow file
    (:mod:`tunelab.data.cache`), which also supplies ``known_lengths`` and
    ``known_supervised`` so neither needs a pass over the tokens.
    """

    input_ids: Sequence[np.ndarray] = field(default_factory=list)
    labels: Sequence[np.ndarray] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    known_lengths: np.ndarray | None = field(default=None, repr=False)
    known_supervised: int | None = field(default=None, repr=False)
    roles: np.ndarray | None = field(default=None, repr=False)  # preference data: each row's role (vocab.ROLE_*)
    ref_logps: Sequence[np.ndarray] | None = field(default=None, repr=False)  # precomputed reference log-probs

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        if self.known_lengths is not None:
            return self.known_lengths
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    @property
    def supervised_tokens(self) -> int:
        if self.known_supervised is not None:
            return self.known_supervised
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
    train_on: str = "all_assistant",
) -> TokenizedSplit:
    """Tokenize samples; drop those left with no supervised token after truncation.

    ``train_on`` (used when ``mask_prompt`` is on) picks which chat turns carry
    loss: ``all_assistant``, ``last_assistant``, or ``everything`` (every token,
    prompts and completion prompts included, as with ``mask_prompt=False``).

    Text and completion samples are tokenized piece by piece (prompt, then
    completion without special tokens, then EOS).  A rendered chat is tokenized
    whole, as the model reads it at inference, and tokens are labelled by their
    character offsets; tokenizers without offsets fall back to piece by piece.
    """
    if train_on not in TRAIN_ON:
        raise ConfigError(f"data.train_on must be one of {', '.join(TRAIN_ON)} (got {train_on!r})")
    mask_prompt = mask_prompt and train_on != "everything"
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the tokenizer has no EOS token; set eos_token in its tokenizer_config.json")
    prefix = special_prefix(tokenizer)
    whole = bool(getattr(tokenizer, "is_fast", False))
    flat, owners, roles = _sequences(samples)
    where = [sources[o] if sources else ("<data>", o + 1) for o in owners]
    plans = [_pieces(s, tokenizer, template, where[i], mask_prompt, train_on) for i, s in enumerate(flat)]
    encoded = _encode(flat, plans, tokenizer, whole)
    built = [_assemble(s, p, e, prefix, eos, mask_prompt) for s, p, e in zip(flat, plans, encoded, strict=True)]
    rows: list[np.ndarray] = []
    row_labels: list[np.ndarray] = []
    out = TokenizedSplit(rows, row_labels)
    kept_roles: list[int] = []
    start = 0
    while start < len(flat):  # one unit at a time: an example, or a preference pair (kept or dropped whole)
        end = start + 1
        while end < len(flat) and owners[end] == owners[start]:
            end += 1
        unit = [(ids[:max_seq_len], labels[:max_seq_len]) for ids, labels in built[start:end]]
        out.truncated += sum(len(ids) > max_seq_len for ids, _ in built[start:end])
        trains = flat[start].kind != "prompt"  # a GRPO prompt trains nothing itself: its completions are sampled
        if trains and any(all(label == IGNORE for label in labels[1:]) for _, labels in unit):
            out.dropped += 1
        else:
            rows.extend(np.asarray(ids, dtype=np.int32) for ids, _ in unit)
            row_labels.extend(np.asarray(labels, dtype=np.int32) for _, labels in unit)
            kept_roles.extend(roles[start:end])
        start = end
    if any(roles):
        out.roles = np.asarray(kept_roles, dtype=np.int8)
    return out


def _sequences(samples: Sequence[Sample]) -> tuple[list[Sample], list[int], list[int]]:
    """Each sample's token sequences (a pair has two), the sample each comes from, and its role (0: none)."""
    flat: list[Sample] = []
    owners: list[int] = []
    roles: list[int] = []
    for index, sample in enumerate(samples):
        if sample.pair is not None:
            flat.extend(sample.pair)
            owners.extend((index, index))
            roles.extend((ROLE_CHOSEN, ROLE_REJECTED))
            continue
        flat.append(sample)
        owners.append(index)
        roles.append(0 if sample.label is None else ROLE_DESIRABLE if sample.label else ROLE_UNDESIRABLE)
    return flat, owners, roles


def _assemble(
    sample: Sample, plan: list[tuple[str, bool]], pieces: Encoded, prefix: list[int], eos: int, mask_prompt: bool
) -> tuple[list[int], list[int]]:
    """One sequence's ids and labels from its encoded pieces (uncut)."""
    chat = sample.kind == "chat" or bool(sample.messages)  # a rendered conversation holds its own specials
    ids: list[int] = list(prefix) if not chat else []
    labels: list[int] = [IGNORE] * len(ids)
    for (_text, trained), (piece_ids, piece_labels) in zip(plan, pieces, strict=False):
        ids.extend(piece_ids)
        if piece_labels is not None:
            labels.extend(piece_labels if mask_prompt else piece_ids)
        else:
            labels.extend(piece_ids if (trained or not mask_prompt) else [IGNORE] * len(piece_ids))
    if not chat and sample.kind != "prompt":  # a GRPO prompt ends where the model's answer starts
        ids.append(eos)
        labels.append(eos)
    return ids, labels


Encoded = list[tuple[list[int], list[int] | None]]


def _encode(
    samples: Sequence[Sample], plans: list[list[tuple[str, bool]]], tokenizer: Any, whole: bool
) -> list[Encoded]:
    """Token ids per piece (``labels`` None), or per whole chat with labels from offsets."""
    results: list[Encoded] = [[] for _ in samples]
    piecewise = [i for i, s in enumerate(samples) if not (whole and s.kind == "chat")]
    texts = [text for i in piecewise for text, _ in plans[i]]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    cursor = 0
    for i in piecewise:
        for _ in plans[i]:
            results[i].append((list(ids[cursor]), None))
            cursor += 1
    chats = [i for i, s in enumerate(samples) if whole and s.kind == "chat"]
    if chats:
        full = [plans[i] for i in chats]
        enc = tokenizer(
            ["".join(text for text, _ in plan) for plan in full], add_special_tokens=False, return_offsets_mapping=True
        )
        for i, plan, chat_ids, offsets in zip(chats, full, enc["input_ids"], enc["offset_mapping"], strict=True):
            results[i] = [(list(chat_ids), _labels_from_offsets(chat_ids, offsets, plan))]
    return results


def _labels_from_offsets(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], plan: list[tuple[str, bool]]
) -> list[int]:
    """A token is trained when its characters overlap a trained piece."""
    spans, position = [], 0
    for text, trained in plan:
        if trained:
            spans.append((position, position + len(text)))
        position += len(text)
    if not len(ids):
        return []
    bounds = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts, ends = bounds[:, 0], np.maximum(bounds[:, 1], bounds[:, 0] + 1)
    hit = np.zeros(len(ids), dtype=bool)
    for begin, stop in spans:
        hit |= (starts < stop) & (ends > begin)
    return np.where(hit, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def _pieces(
    sample: Sample, tokenizer: Any, template: str, where: tuple[str, int], mask_prompt: bool, train_on: str
) -> list[tuple[str, bool]]:
    if sample.kind == "text":
        return [(sample.text, True)]
    if sample.kind == "prompt":  # GRPO: what the model is asked, up to its open turn; nothing is trained
        if not sample.messages:
            return [(sample.prompt, False)]
        return [(render(tokenizer, template, sample.messages, generation_prompt=True, tools=sample.tools), False)]
    if sample.kind == "completion":
        pieces = [(sample.completion, True)]
        return [(sample.prompt, False), *pieces] if sample.prompt else pieces
    if needs_builtin(template, sample.messages, sample.tools):
        raise TemplateLacksTools(
            "this conversation uses tools that the model's chat template can't render",
            path=where[0],
            line=where[1],
            hint="tunelab switches the dataset to its built-in ChatML template for tool calls",
        )
    if not mask_prompt:  # every token is trained: no need to locate the assistant turns
        return [(render(tokenizer, template, sample.messages, generation_prompt=False, tools=sample.tools), True)]
    return chat_segments(
        tokenizer,
        template,
        sample.messages,
        where=where,
        train_on=train_on,
        tools=sample.tools,
        skip=sample.prompt_turns,
    )


def length_summary(lengths: np.ndarray) -> dict[str, Any]:
    """Count, min, mean, median, p95 and max of example lengths (just the count when there are none)."""
    if not len(lengths):
        return {"count": 0}
    return {
        "count": len(lengths),
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }
