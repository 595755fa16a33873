"""`tunelab data validate`: the same checks training runs, alone, with a report.

Beyond "every record is valid", the report answers the questions people ask
before a run: how long are the examples in tokens (a fixed-bin histogram), how
many would be cut at ``max_seq_len``, and are there exact duplicates (within a
split, and validation examples that also appear in train).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tunelab.data.formats import NO_ANSWER, Sample, detect_format, to_sample
from tunelab.data.sources import Record, iter_records, resolve_files
from tunelab.data.templates import template_for
from tunelab.data.tokenize import length_summary, tokenize_samples
from tunelab.errors import DataError
from tunelab.vocab import IGNORE

DUPLICATES_SHOWN = 5
# Bad records reported in one pass (the rest are counted): a messy file is fixed in one round, not one per error.
PROBLEMS_SHOWN = 50
LINES_SHOWN = 12  # line numbers listed per kind of problem
PROBLEMS_KEPT = 10_000  # reading stops here: memory stays bounded on a file that is wrong throughout
# Records are read, checked and tokenized a chunk at a time, so a dataset larger than memory validates too.
CHUNK = 1024
# Long enough that nothing is cut: the report needs each example's full length to say what truncation loses.
_UNCUT = 1_048_576


@dataclass
class _Tokenizing:
    """How a split is tokenized for the report: exactly as training does, but uncut."""

    tokenizer: Any
    template: str
    mask_prompt: bool
    train_on: str


@dataclass
class _Tally:
    """Running totals of one split, fed one chunk of records at a time."""

    max_seq_len: int
    records: int = 0
    keys: dict[bytes, int] = field(default_factory=dict)  # record digest -> first line
    repeats: list[dict[str, int]] = field(default_factory=list)
    duplicate_count: int = 0
    also_in_train: int = 0
    chars: list[int] = field(default_factory=list)
    full_lengths: list[int] = field(default_factory=list)
    cut_lengths: list[int] = field(default_factory=list)
    supervised: int = 0
    dropped: int = 0
    prompts: bool = False  # GRPO prompts: nothing in them is trained, and none is dropped for it

    def add_records(self, chunk: Sequence[Record], train_keys: Mapping[bytes, int] | None) -> None:
        for record in chunk:
            key = _record_key(record)
            if key in self.keys:
                self.duplicate_count += 1
                if len(self.repeats) < DUPLICATES_SHOWN:
                    self.repeats.append({"line": record.line, "same_as": self.keys[key]})
            else:
                self.keys[key] = record.line
            self.also_in_train += train_keys is not None and key in train_keys
            self.chars.append(len(str(record.data)))
        self.records += len(chunk)

    def add_tokens(self, input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], dropped: int) -> None:
        """Uncut tokenization of a chunk: cut it here at ``max_seq_len``, as the trainer will."""
        self.dropped += dropped
        for ids, labs in zip(input_ids, labels, strict=True):
            self.full_lengths.append(len(ids))
            trained = int((labs[1 : self.max_seq_len] != IGNORE).sum())
            if trained == 0 and not self.prompts:
                self.dropped += 1
                continue
            self.cut_lengths.append(min(len(ids), self.max_seq_len))
            self.supervised += trained


def validate_dataset(
    path: str,
    *,
    valid: str | None = None,
    fmt: str = "auto",
    model: str | None = None,
    max_seq_len: int = 1024,
    mask_prompt: bool = True,
    train_on: str = "all_assistant",
    columns: Mapping[str, str] | None = None,
    split: str = "train",
    subset: str | None = None,
) -> dict[str, Any]:
    """Validate every record and summarise; bad records raise one :class:`DataError` listing them all, by kind.

    Each split reports its record count and duplicates; with ``model`` (a
    checkpoint folder or hub id) also token-length statistics, a length
    histogram and truncation counts, computed with that model's tokenizer and
    chat template exactly as training tokenizes.
    """
    train_path, valid_path = resolve_files(path, valid)
    problems: list[DataError] = []
    note = functools.partial(_note, problems)
    train = iter_records(train_path, split=split, columns=columns, subset=subset, on_bad=note)
    first = next(train, None)
    if first is None:  # every line was bad
        raise grouped(problems)
    detected = fmt == "auto"
    fmt = fmt if fmt != "auto" else detect_format(first)
    report: dict[str, Any] = {"format": fmt, "splits": {}}
    tokenizing = None
    if model is not None:
        from tunelab.hub import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(model))
        template, report["chat_template"] = template_for(tokenizer)
        tokenizing = _Tokenizing(tokenizer, template, mask_prompt, train_on)
    tally = _scan(itertools.chain([first], train), fmt, tokenizing, max_seq_len, None, problems)
    valid_tally = None
    if valid_path is not None:
        records = iter_records(valid_path, split="validation", columns=columns, subset=subset, on_bad=note)
        valid_tally = _scan(records, fmt, tokenizing, max_seq_len, tally.keys, problems)
    if problems:
        error = grouped(problems)
        answered = tally.records + (valid_tally.records if valid_tally else 0)
        if detected and fmt == "chat" and not answered and all(NO_ANSWER in exc.message for exc in problems):
            # Conversations with no answer at all are what GRPO reads (prompts, answers sampled in training).
            error.hint = (
                "if these are prompts for GRPO, validate them with --format grpo (training with "
                "objective.name: grpo reads them so); for SFT each conversation needs an assistant message"
            )
        raise error
    report["splits"]["train"] = _entry(str(train_path), tally, tokenizing is not None)
    if valid_tally is not None:
        report["splits"]["valid"] = _entry(str(valid_path), valid_tally, tokenizing is not None)
        report["splits"]["valid"]["duplicates"]["also_in_train"] = valid_tally.also_in_train
    return report


def grouped(problems: list[DataError]) -> DataError:
    """One error listing every bad record found, grouped by kind of problem, with their files and lines."""
    kinds: dict[str, list[DataError]] = {}
    for exc in problems:
        kinds.setdefault(_kind(exc), []).append(exc)
    lines = [
        ("at least " if len(problems) >= PROBLEMS_KEPT else "")
        + f"{len(problems):,} bad record{'s' if len(problems) != 1 else ''}"
        + (f" (the first {PROBLEMS_SHOWN} are listed)" if len(problems) > PROBLEMS_SHOWN else "")
        + ":"
    ]
    shown = problems[:PROBLEMS_SHOWN]
    for kind, found in sorted(kinds.items(), key=lambda item: -len(item[1])):
        listed = [exc for exc in found if exc in shown]
        where = _where(listed[:LINES_SHOWN])
        more = f" and {len(found) - min(len(listed), LINES_SHOWN):,} more" if len(found) > LINES_SHOWN else ""
        lines.append(f"  {kind} ({len(found):,}): {where}{more}")
    first = problems[0]
    error = DataError("\n".join(lines), hint=f"fix these and validate again (first: {first.message})")
    error.path, error.line = first.path, first.line  # where the first one is, for callers that point at it
    return error


def _where(found: list[DataError]) -> str:
    """``file: lines 2, 5`` per file, in the order found."""
    by_file: dict[str | None, list[str]] = {}
    for exc in found:
        by_file.setdefault(exc.path, []).append(str(exc.line))
    return "; ".join(f"{path}: line{'s' if len(n) > 1 else ''} {', '.join(n)}" for path, n in by_file.items())


def _kind(exc: DataError) -> str:
    """The problem without where it is: indices and columns vary between records of one kind."""
    text = exc.message
    prefix = f"{exc.path}:{exc.line}: "
    text = text[len(prefix) :] if text.startswith(prefix) else text
    return re.sub(r"\[\d+\]", "[…]", re.sub(r", column \d+", "", text))


def _scan(
    records: Iterator[Record],
    fmt: str,
    tokenizing: _Tokenizing | None,
    max_seq_len: int,
    train_keys: Mapping[bytes, int] | None,
    problems: list[DataError],
) -> _Tally:
    tally = _Tally(max_seq_len, prompts=fmt == "grpo")
    while chunk := list(itertools.islice(records, CHUNK)):
        samples, chunk = _valid_samples(chunk, fmt, problems)
        tally.add_records(chunk, train_keys)
        if tokenizing is not None and not problems:  # once a record is bad the report is the problems
            tokens = tokenize_samples(
                samples,
                tokenizing.tokenizer,
                template=tokenizing.template,
                max_seq_len=_UNCUT,
                mask_prompt=tokenizing.mask_prompt,
                sources=[(r.path, r.line) for r in chunk],
                train_on=tokenizing.train_on,
            )
            tally.add_tokens(tokens.input_ids, tokens.labels, tokens.dropped)
    return tally


def _valid_samples(chunk: list[Record], fmt: str, problems: list[DataError]) -> tuple[list[Sample], list[Record]]:
    """The records of ``chunk`` that are valid ``fmt`` and their samples; each bad one joins ``problems``."""
    samples, kept = [], []
    for record in chunk:
        try:
            samples.append(to_sample(record, fmt))
        except DataError as exc:
            _note(problems, exc)
            continue
        kept.append(record)
    return samples, kept


def _note(problems: list[DataError], exc: DataError) -> None:
    """Keep one more problem; past :data:`PROBLEMS_KEPT` the report is raised (a messy file has said enough)."""
    problems.append(exc)
    if len(problems) >= PROBLEMS_KEPT:
        raise grouped(problems) from None


def _entry(path: str, tally: _Tally, with_tokens: bool) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "path": path,
        "records": tally.records,
        "duplicates": {"count": tally.duplicate_count, "first": tally.repeats},  # as duplicates() reports
    }
    if with_tokens:
        full = np.asarray(tally.full_lengths, dtype=np.int64)
        entry["tokens"] = _token_stats(
            np.asarray(tally.cut_lengths, dtype=np.int64), tally, int((full > tally.max_seq_len).sum())
        )
        entry["histogram"] = length_histogram(full, tally.max_seq_len)
    else:
        entry["chars"] = {"min": min(tally.chars), "mean": sum(tally.chars) / len(tally.chars), "max": max(tally.chars)}
    return entry


def _token_stats(lengths: np.ndarray, tally: _Tally, truncated: int) -> dict[str, Any]:
    """Lengths and supervised tokens of the examples the trainer keeps, cut at ``max_seq_len``."""
    counts = {"supervised_tokens": tally.supervised, "truncated": truncated, "dropped": tally.dropped}
    return {**length_summary(lengths), **counts}


def duplicates(records: Sequence[Record]) -> dict[str, Any]:
    """Exact duplicates: how many records repeat an earlier one, and the first few (line, same as line)."""
    tally = _Tally(max_seq_len=0)
    tally.add_records(records, None)
    return {"count": tally.duplicate_count, "first": tally.repeats}


def length_histogram(lengths: np.ndarray, max_seq_len: int) -> list[dict[str, Any]]:
    """Counts of full token lengths in fixed bins: powers of two up to ``max_seq_len``, then "over"."""
    edges = [min(16, max_seq_len)]
    while edges[-1] < max_seq_len:
        edges.append(min(edges[-1] * 2, max_seq_len))
    bins: list[dict[str, Any]] = []
    low = 1
    for high in edges:
        bins.append({"low": low, "high": high, "count": int(((lengths >= low) & (lengths <= high)).sum())})
        low = high + 1
    bins.append({"low": max_seq_len + 1, "high": None, "count": int((lengths > max_seq_len).sum())})
    return bins


def _record_key(record: Record) -> bytes:
    """A canonical digest of a record's content: key order and whitespace in the file don't matter."""
    text = json.dumps(record.data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


__all__ = ["duplicates", "length_histogram", "validate_dataset"]
