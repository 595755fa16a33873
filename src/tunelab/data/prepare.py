"""From ``data:`` config and a tokenizer to tokenized train/valid splits (and a data report).

Records are streamed in chunks, validated and tokenized (in worker processes
when the data is big enough to pay for them) and appended to Arrow files in
the tokenization cache; the splits the trainer gets are memory-mapped views of
those files, so a dataset larger than RAM never has to fit in it.  A second run
with the same data, tokenizer and options skips all of that (see ``cache.py``).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import DataCfg
from tunelab.data import cache
from tunelab.data.formats import detect_format, to_sample, to_samples
from tunelab.data.parallel import CHUNK_RECORDS, Task, TokenizeOptions, default_num_proc, tokenize_stream
from tunelab.data.sources import Record, content_hash, iter_records, read_records, resolve_files
from tunelab.data.templates import BUILTIN_NAME, CHATML, TemplateLacksTools, template_for
from tunelab.data.tokenize import TokenizedSplit, length_summary
from tunelab.errors import DataError

log = logging.getLogger(__name__)

# Data this small is validated whole before the tokenizer and model load (a bad record fails in a second);
# bigger data is validated by the tokenizing pass itself, which still runs before the model loads.
CHECK_FIRST_BYTES = 64 << 20
# Below this a process pool costs more to start than it saves.
PARALLEL_MIN_BYTES = 8 << 20


@dataclass(frozen=True)
class DataSource:
    """The files of both splits, their format and identity; record counts when they were checked up front."""

    train_path: Path | str
    valid_path: Path | str | None
    format: str
    content_hash: str
    local: bool  # every split is a local file or folder (a hub dataset can't be hashed, so isn't cached)
    size_bytes: int
    train_count: int | None = None


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
    cache_key: str | None = None
    cache_status: str = "off"  # hit | miss | off
    valid_split: float = 0.0  # fraction of train carved off as validation (0: none carved)

    @property
    def stats(self) -> dict[str, Any]:
        """Length statistics of both splits and how they were made (what the registry stores)."""
        out: dict[str, Any] = {"train": length_stats(self.train), "template": self.template_name}
        if self.valid is not None:
            out["valid"] = length_stats(self.valid)
        out["cache"] = self.cache_status
        if self.valid_split:
            out["valid_split"] = self.valid_split
        return out


@dataclass(frozen=True)
class LoadedRecords:
    """Validated-but-untokenized records of both splits (for reports on small data)."""

    train: list[Record]
    valid: list[Record] | None
    format: str
    train_path: Path | str
    valid_path: Path | str | None


def load_records(cfg: DataCfg) -> LoadedRecords:
    """Read and validate both splits into memory (format detected once, from train, and enforced on both)."""
    train_path, valid_path = resolve_files(cfg.train, cfg.valid)
    train = read_records(train_path, split=cfg.split, columns=cfg.columns, subset=cfg.subset)
    fmt = cfg.format if cfg.format != "auto" else detect_format(train[0])
    to_samples(train, fmt)
    valid = None
    if valid_path is not None:
        valid = read_records(valid_path, split="validation", columns=cfg.columns, subset=cfg.subset)
        to_samples(valid, fmt)
    return LoadedRecords(train, valid, fmt, train_path, valid_path)


def scan_data(cfg: DataCfg) -> DataSource:
    """Find the files, detect the format and hash the content; small data is also validated whole here.

    Streams: no split is held in memory, whatever its size.
    """
    train_path, valid_path = resolve_files(cfg.train, cfg.valid)
    first = next(_records(cfg, train_path, "train"))
    fmt = cfg.format if cfg.format != "auto" else detect_format(first)
    paths = [p for p in (train_path, valid_path) if p is not None]
    local = all(Path(p).expanduser().exists() for p in paths)
    size = sum(_size(Path(p).expanduser()) for p in paths) if local else 0
    count = None
    if local and size <= CHECK_FIRST_BYTES:
        count = _check(_records(cfg, train_path, "train"), fmt)
        if valid_path is not None:
            _check(_records(cfg, valid_path, "valid"), fmt)
    return DataSource(train_path, valid_path, fmt, content_hash([train_path, valid_path]), local, size, count)


def _records(cfg: DataCfg, path: Path | str, split: str) -> Iterator[Record]:
    return iter_records(
        path, split=cfg.split if split == "train" else "validation", columns=cfg.columns, subset=cfg.subset
    )


def _check(records: Iterator[Record], fmt: str) -> int:
    count = 0
    for record in records:
        to_sample(record, fmt)
        count += 1
    return count


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def prepare_data(cfg: DataCfg, tokenizer: Any, source: DataSource | None = None, *, seed: int = 0) -> PreparedData:
    """Tokenized train and validation splits: from the cache when the key matches, else built (and cached).

    ``seed`` (``train.seed``) picks which records ``data.valid_split`` carves
    off as validation when there is no validation set.
    """
    source = source if source is not None else scan_data(cfg)
    template, template_name = template_for(tokenizer)
    carve = cfg.valid_split if source.valid_path is None else 0.0
    use_cache = cfg.cache and source.local
    try:
        key, entry, status = _tokenized(cfg, source, tokenizer, template, carve, seed, use_cache)
    except TemplateLacksTools as exc:
        # One template for the whole dataset: it is the one saved with the adapter, so chat and
        # export must see what every example was trained with.
        log.warning("%s; tokenizing the dataset with the built-in ChatML template instead", exc.message)
        template, template_name = CHATML, BUILTIN_NAME
        key, entry, status = _tokenized(cfg, source, tokenizer, template, carve, seed, use_cache)
    valid = entry.valid if entry.valid is not None and len(entry.valid) else None
    return PreparedData(
        train=entry.train,
        valid=valid,
        format=source.format,
        template_name=template_name,
        train_path=str(source.train_path),
        valid_path=str(source.valid_path) if source.valid_path is not None else None,
        content_hash=source.content_hash,
        cache_key=key if use_cache else None,
        cache_status=status,
        valid_split=carve,
    )


def _tokenized(
    cfg: DataCfg, source: DataSource, tokenizer: Any, template: str, carve: float, seed: int, use_cache: bool
) -> tuple[str, cache.CachedSplits, str]:
    """The splits for one template: from the cache when its key matches, else tokenized (and cached)."""
    key = cache.cache_key(_key_components(cfg, source, tokenizer, template, carve, seed))
    entry = cache.load_entry(key) if use_cache else None
    status = "hit" if entry is not None else ("miss" if use_cache else "off")
    log.info("tokenization cache %s (%s)", status, key)
    if entry is None:
        entry = _build(cfg, source, tokenizer, template, key, carve=carve, seed=seed, keep=use_cache)
    return key, entry, status


def _key_components(
    cfg: DataCfg, source: DataSource, tokenizer: Any, template: str, carve: float, seed: int
) -> dict[str, Any]:
    """Everything the token ids and labels depend on."""
    parts: dict[str, Any] = {
        "data": source.content_hash,
        "tokenizer": cache.tokenizer_fingerprint(tokenizer),
        "template": hashlib.sha256(template.encode()).hexdigest(),
        "format": source.format,
        "max_seq_len": cfg.max_seq_len,
        "mask_prompt": cfg.mask_prompt,
        "train_on": cfg.train_on,
        "columns": dict(sorted(cfg.columns.items())),
        "split": cfg.split,
        "subset": cfg.subset,
    }
    if carve:
        parts["valid_split"] = carve
        parts["seed"] = seed
    return parts


def _build(
    cfg: DataCfg,
    source: DataSource,
    tokenizer: Any,
    template: str,
    key: str,
    *,
    carve: float,
    seed: int,
    keep: bool,
) -> cache.CachedSplits:
    opts = TokenizeOptions(source.format, template, cfg.max_seq_len, cfg.mask_prompt, cfg.train_on)
    num_proc = default_num_proc(cfg.num_proc) if source.size_bytes >= PARALLEL_MIN_BYTES else 1
    builder = cache.EntryBuilder(key)
    try:
        splits = [("train", source.train_path, carve)]
        if source.valid_path is not None:
            splits.append(("valid", source.valid_path, 0.0))
        for name, path, fraction in splits:
            carver = _Carver(seed, fraction, source.train_count) if fraction else None
            tasks = _tasks(_records(cfg, path, name), carver)
            for train_chunk, valid_chunk in tokenize_stream(tasks, tokenizer, opts, num_proc=num_proc):
                builder.writer(name).write(train_chunk)
                if valid_chunk is not None:
                    builder.writer("valid").write(valid_chunk)
        if builder.writer("train").rows == 0:
            raise DataError(
                "no training example has a supervised token left",
                path=str(source.train_path),
                hint="raise data.max_seq_len or check the completions are not empty",
            )
        return builder.commit({"format": source.format, "num_proc": num_proc}, keep=keep)
    except BaseException:
        builder.abort()
        raise


def _tasks(records: Iterator[Record], carver: _Carver | None) -> Iterator[Task]:
    start = 0
    while chunk := list(islice(records, CHUNK_RECORDS)):
        yield chunk, (carver.select(start, len(chunk)) if carver is not None else None)
        start += len(chunk)


class _Carver:
    """Which train records (by position) become validation: a seeded hash per record, so any chunking agrees.

    With the record count known the fraction is exact (at least one record,
    never all); otherwise each record goes with probability ``fraction``.
    """

    def __init__(self, seed: int, fraction: float, count: int | None) -> None:
        self.seed = seed
        self.threshold = fraction
        if count is not None and count > 1:
            k = min(max(1, round(fraction * count)), count - 1)
            self.threshold = float(np.partition(self._uniform(np.arange(count)), k - 1)[k - 1])

    def _uniform(self, index: np.ndarray) -> np.ndarray:
        """splitmix64 of (seed, index), as floats in [0, 1)."""
        with np.errstate(over="ignore"):
            x = index.astype(np.uint64) + np.uint64(self.seed + 1) * np.uint64(0x9E3779B97F4A7C15)
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
        return (x >> np.uint64(11)).astype(np.float64) * 2.0**-53

    def select(self, start: int, n: int) -> np.ndarray:
        """Boolean mask: which of records ``start .. start+n`` go to validation."""
        return self._uniform(np.arange(start, start + n)) <= self.threshold


def length_stats(split: TokenizedSplit) -> dict[str, float]:
    """Token-length summary used by `data validate` and the run log."""
    summary = length_summary(split.lengths)
    if summary["count"] == 0:
        return summary
    return {
        **summary,
        "supervised_tokens": split.supervised_tokens,
        "truncated": split.truncated,
        "dropped": split.dropped,
    }
