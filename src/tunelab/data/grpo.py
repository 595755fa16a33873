"""GRPO's data: prompts to sample completions for, and the fields the reward functions read.

A record is ``{"prompt": text}``, ``{"prompt": [messages]}`` or ``{"messages": [...]}`` (ending before the
assistant's reply) plus any other fields (``answer``…), which reach the reward functions untouched.  The
whole file is validated up front with file/line errors, before the model loads; the prompts are then
token ids (through the chat template for messages, ending on an open assistant turn), each no longer than
``data.max_seq_len - objective.max_new_tokens`` so every sampled row fits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import DataCfg
from tunelab.data.formats import to_sample
from tunelab.data.sources import content_hash, read_records, resolve_files
from tunelab.data.tokenize import TokenizedSplit
from tunelab.errors import DataError
from tunelab.vocab import IGNORE


@dataclass(frozen=True)
class PromptSet:
    """One split's prompts: the records (for the reward functions), where each came from, and their ids."""

    examples: list[dict[str, Any]]
    where: list[str]  # "file:line" of each, for error messages
    chat: list[bool]  # whether each prompt is a conversation (rendered through the chat template)
    ids: list[list[int]]

    def __len__(self) -> int:
        return len(self.examples)

    def as_split(self) -> TokenizedSplit:
        """The prompts as a token split (no label: nothing is trained on a prompt), for the run's data stats."""
        ids = [np.asarray(i, dtype=np.int64) for i in self.ids]
        return TokenizedSplit(ids, [np.full(len(i), IGNORE, dtype=np.int64) for i in ids])


@dataclass(frozen=True)
class GrpoData:
    train: PromptSet
    valid: PromptSet | None
    train_path: str
    valid_path: str | None
    content_hash: str


Encode = Callable[[list[dict[str, Any]], bool], list[int]]
"""(messages, chat) -> prompt ids: the one way prompts become ids (``tunelab.inference.prompt_token_ids``)."""


def read_grpo(cfg: DataCfg, encode: Encode, max_new_tokens: int) -> GrpoData:
    """Both splits' prompts, validated record by record (file and line in every error) and tokenized."""
    train_path, valid_path = resolve_files(cfg.train, cfg.valid)
    train = _read(train_path, cfg, "train", encode, max_new_tokens)
    valid = _read(valid_path, cfg, "validation", encode, max_new_tokens) if valid_path is not None else None
    return GrpoData(train, valid, str(train_path), str(valid_path) if valid_path else None,
                    content_hash([train_path, valid_path]))  # fmt: skip


def check_grpo(cfg: DataCfg) -> int:
    """Validate every record of the training split as grpo data (no tokenizer needed); returns the count."""
    train_path, _ = resolve_files(cfg.train, cfg.valid)
    records = read_records(train_path, split=cfg.split, columns=cfg.columns, subset=cfg.subset)
    for record in records:
        to_sample(record, "grpo")
    return len(records)


def _read(path: Path | str, cfg: DataCfg, split: str, encode: Encode, max_new_tokens: int) -> PromptSet:
    records = read_records(path, split=cfg.split if split == "train" else split, columns=cfg.columns,
                           subset=cfg.subset)  # fmt: skip
    room = cfg.max_seq_len - max_new_tokens
    if room < 1:
        raise DataError(
            f"data.max_seq_len {cfg.max_seq_len} leaves no room for a prompt before objective.max_new_tokens "
            f"{max_new_tokens}",
            hint="raise data.max_seq_len or lower objective.max_new_tokens",
        )
    examples, where, chat, ids = [], [], [], []
    for record in records:
        sample = to_sample(record, "grpo")
        is_chat = bool(sample.messages)
        messages = list(sample.messages) if is_chat else [{"role": "user", "content": sample.prompt}]
        tokens = encode(messages, is_chat)
        if len(tokens) > room:
            raise DataError(
                f"the prompt is {len(tokens)} tokens; with objective.max_new_tokens {max_new_tokens} it passes "
                f"data.max_seq_len {cfg.max_seq_len}",
                path=record.path,
                line=record.line,
                hint="shorten the prompt, raise data.max_seq_len or lower objective.max_new_tokens",
            )
        examples.append(dict(record.data))
        where.append(f"{record.path}:{record.line}" if record.line else str(record.path))
        chat.append(is_chat)
        ids.append(tokens)
    return PromptSet(examples, where, chat, ids)


def prompt_order(count: int, seed: int, shuffle: bool, start: int, n: int) -> list[int]:
    """Indices of the ``n`` prompts from position ``start`` of the run's prompt stream.

    Each epoch is a permutation drawn from (seed, epoch) alone, so where a run is in the stream is one
    number (``TrainerState.cursor`` counts prompts) and a resumed run sees the same prompts.
    """
    out: list[int] = []
    position = start
    while len(out) < n:
        epoch, offset = divmod(position, count)
        order = np.random.default_rng([seed, epoch]).permutation(count) if shuffle else np.arange(count)
        take = min(n - len(out), count - offset)
        out.extend(int(i) for i in order[offset : offset + take])
        position += take
    return out


def epochs_of(prompts: Sequence[Any], cursor: int) -> float:
    return cursor / max(len(prompts), 1)
