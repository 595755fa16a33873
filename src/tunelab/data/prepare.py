"""From ``data:`` config and a tokenizer to tokenized train/valid splits (and a data report)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import DataCfg
from tunelab.data.formats import detect_format, to_samples
from tunelab.data.sources import Record, content_hash, read_records, resolve_files
from tunelab.data.templates import template_for
from tunelab.data.tokenize import TokenizedSplit, tokenize_samples
from tunelab.errors import DataError


@dataclass
class PreparedData:
    """Everything the trainer needs from the data side, plus what the registry records."""

    train: TokenizedSplit
    valid: TokenizedSplit | None
    format: str
    template_name: str
    train_path: str
    valid_path: str | None
    content_hash: str


@dataclass(frozen=True)
class LoadedRecords:
    """Validated-but-untokenized records of both splits."""

    train: list[Record]
    valid: list[Record] | None
    format: str
    train_path: Path | str
    valid_path: Path | str | None


def load_records(cfg: DataCfg) -> LoadedRecords:
    """Read and validate both splits (format detected once, from train, and enforced on both)."""
    train_path, valid_path = resolve_files(cfg.train, cfg.valid)
    train = read_records(train_path, split="train")
    fmt = cfg.format if cfg.format != "auto" else detect_format(train[0])
    to_samples(train, fmt)
    valid = read_records(valid_path, split="validation") if valid_path is not None else None
    if valid is not None:
        to_samples(valid, fmt)
    return LoadedRecords(train, valid, fmt, train_path, valid_path)


def prepare_data(cfg: DataCfg, tokenizer: Any, loaded: LoadedRecords | None = None) -> PreparedData:
    """Tokenize the train and validation splits (loading and validating them first if not given)."""
    loaded = loaded if loaded is not None else load_records(cfg)
    template, template_name = template_for(tokenizer)
    train = _tokenize(loaded.train, loaded.format, tokenizer, template, cfg)
    if len(train) == 0:
        raise DataError(
            "no training example has a supervised token left",
            path=str(loaded.train_path),
            hint="raise data.max_seq_len or check the completions are not empty",
        )
    valid = _tokenize(loaded.valid, loaded.format, tokenizer, template, cfg) if loaded.valid else None
    return PreparedData(
        train=train,
        valid=valid if valid is not None and len(valid) else None,
        format=loaded.format,
        template_name=template_name,
        train_path=str(loaded.train_path),
        valid_path=str(loaded.valid_path) if loaded.valid_path is not None else None,
        content_hash=content_hash([loaded.train_path, loaded.valid_path]),
    )


def _tokenize(records: list[Record], fmt: str, tokenizer: Any, template: str, cfg: DataCfg) -> TokenizedSplit:
    samples = to_samples(records, fmt)
    return tokenize_samples(
        samples,
        tokenizer,
        template=template,
        max_seq_len=cfg.max_seq_len,
        mask_prompt=cfg.mask_prompt,
        sources=[(r.path, r.line) for r in records],
    )


def length_stats(split: TokenizedSplit) -> dict[str, float]:
    """Token-length summary used by `data validate` and the run log."""
    lengths = split.lengths
    if not len(lengths):
        return {"count": 0}
    return {
        "count": len(lengths),
        "min": int(lengths.min()),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "supervised_tokens": split.supervised_tokens,
        "truncated": split.truncated,
        "dropped": split.dropped,
    }
