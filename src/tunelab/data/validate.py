"""`tunelab data validate`: the same checks training runs, alone, with a report.

Beyond "every record is valid", the report answers the questions people ask
before a run: how long are the examples in tokens (a fixed-bin histogram), how
many would be cut at ``max_seq_len``, and are there exact duplicates (within a
split, and validation examples that also appear in train).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.formats import detect_format, to_samples
from tunelab.data.sources import Record, read_records, resolve_files
from tunelab.data.templates import template_for
from tunelab.data.tokenize import IGNORE, tokenize_samples

DUPLICATES_SHOWN = 5
# Long enough that nothing is cut: the report needs each example's full length to say what truncation loses.
_UNCUT = 1_048_576


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
    """Validate every record (raising :class:`DataError` on the first bad one) and summarise.

    Each split reports its record count and duplicates; with ``model`` (a
    checkpoint folder or hub id) also token-length statistics, a length
    histogram and truncation counts, computed with that model's tokenizer and
    chat template exactly as training tokenizes.
    """
    train_path, valid_path = resolve_files(path, valid)
    train = read_records(train_path, split=split, columns=columns, subset=subset)
    fmt = fmt if fmt != "auto" else detect_format(train[0])
    splits: dict[str, tuple[list[Record], Path | str]] = {"train": (train, train_path)}
    if valid_path is not None:
        splits["valid"] = (read_records(valid_path, split="validation", columns=columns, subset=subset), valid_path)
    samples = {name: to_samples(records, fmt) for name, (records, _) in splits.items()}  # validates all first
    report: dict[str, Any] = {"format": fmt, "splits": {}}
    tokenizer, template = None, None
    if model is not None:
        from tunelab.hub import load_tokenizer, resolve_model_path

        tokenizer = load_tokenizer(resolve_model_path(model))
        template, report["chat_template"] = template_for(tokenizer)
    seen_in_train = {_record_key(r) for r in train} if "valid" in splits else set()
    for name, (records, where) in splits.items():
        entry: dict[str, Any] = {"path": str(where), "records": len(records), "duplicates": duplicates(records)}
        if name == "valid":
            entry["duplicates"]["also_in_train"] = sum(_record_key(r) in seen_in_train for r in records)
        if tokenizer is not None and template is not None:
            full = tokenize_samples(
                samples[name],
                tokenizer,
                template=template,
                max_seq_len=_UNCUT,
                mask_prompt=mask_prompt,
                sources=[(r.path, r.line) for r in records],
                train_on=train_on,
            )
            entry["tokens"] = token_stats(full.input_ids, full.labels, max_seq_len, dropped=full.dropped)
            entry["histogram"] = length_histogram(full.lengths, max_seq_len)
        else:
            entry["chars"] = _char_stats(records)
        report["splits"][name] = entry
    return report


def duplicates(records: Sequence[Record]) -> dict[str, Any]:
    """Exact duplicates: how many records repeat an earlier one, and the first few (line, same as line)."""
    first_line: dict[bytes, int] = {}
    repeats: list[dict[str, int]] = []
    count = 0
    for record in records:
        key = _record_key(record)
        if key in first_line:
            count += 1
            if len(repeats) < DUPLICATES_SHOWN:
                repeats.append({"line": record.line, "same_as": first_line[key]})
        else:
            first_line[key] = record.line
    return {"count": count, "first": repeats}


def token_stats(
    input_ids: Sequence[np.ndarray], labels: Sequence[np.ndarray], max_seq_len: int, *, dropped: int = 0
) -> dict[str, Any]:
    """Lengths and supervised tokens as the trainer sees them (cut at ``max_seq_len``), from uncut tokenization.

    ``dropped`` counts examples with nothing left to train once cut (plus
    those the caller already dropped before cutting).
    """
    kept: list[int] = []
    supervised = truncated = 0
    for ids, labs in zip(input_ids, labels, strict=True):
        truncated += len(ids) > max_seq_len
        trained = int((labs[1:max_seq_len] != IGNORE).sum())
        if trained == 0:
            dropped += 1
            continue
        kept.append(min(len(ids), max_seq_len))
        supervised += trained
    if not kept:
        return {"count": 0, "truncated": truncated, "dropped": dropped, "supervised_tokens": 0}
    lengths = np.asarray(kept)
    return {
        "count": len(kept),
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "supervised_tokens": supervised,
        "truncated": truncated,
        "dropped": dropped,
    }


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


def _char_stats(records: list[Any]) -> dict[str, float]:
    sizes = [len(str(r.data)) for r in records]
    return {"min": min(sizes), "mean": sum(sizes) / len(sizes), "max": max(sizes)}


__all__ = ["duplicates", "length_histogram", "token_stats", "validate_dataset"]
