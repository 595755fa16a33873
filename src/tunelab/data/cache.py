"""Content-addressed cache of tokenized splits, stored as memory-mapped Arrow IPC files.

An entry lives in ``TUNELAB_HOME/cache/tokenized/<key>/``: ``train.arrow``,
``valid.arrow`` (when there is a validation split) and ``meta.json``.  The key
hashes everything the token ids depend on (see :func:`cache_key`), so a hit is
only ever served for the same bytes of data tokenized the same way, and any
change (above all a different tokenizer) misses.

Entries are built in a temporary folder and renamed into place, so a crash
never leaves a half-written entry under a real key; anything unreadable found
there anyway is ignored and rebuilt.  Reading maps the files instead of loading
them: a split larger than RAM is paged in row by row as batches ask for it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from tunelab.data.tokenize import TokenizedSplit
from tunelab.settings import get_settings
from tunelab.vocab import IGNORE

# Bump whenever a code change alters the token ids or labels produced for the same inputs.
TOKENIZATION_VERSION = 2  # 2: one template per dataset (tool calls switch the whole dataset to ChatML)
_SPLITS = ("train", "valid")
# Files that define how a checkpoint folder tokenizes (whichever of them exist are hashed).
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_GLOBS = ("*.tiktoken", "*.model", "additional_chat_templates/*")


def cache_root() -> Path:
    """Where tokenized splits are kept: ``TUNELAB_HOME/cache/tokenized``."""
    return get_settings().home / "cache" / "tokenized"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's files (from its ``name_or_path`` folder) and its in-memory special tokens.

    Two copies of the same files share a fingerprint wherever they live; a
    tokenizer built in memory (no folder) is hashed from its serialised form.
    """
    digest = hashlib.sha256()
    folder = Path(str(getattr(tokenizer, "name_or_path", "") or "")).expanduser()
    files = _tokenizer_files(folder) if str(folder) and folder.is_dir() else []
    for path in files:
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    if not files:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        state = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
        digest.update(state.encode())
    # Loading may change what the files say (e.g. a pad token set to EOS), so the live values count too.
    live = {
        "class": type(tokenizer).__name__,
        "size": len(tokenizer),
        "special": {k: str(v) for k, v in sorted(getattr(tokenizer, "special_tokens_map", {}).items())},
        "ids": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
    }
    digest.update(json.dumps(live, sort_keys=True).encode())
    return digest.hexdigest()


def _tokenizer_files(folder: Path) -> list[Path]:
    found = {folder / name for name in _TOKENIZER_FILES if (folder / name).is_file()}
    for pattern in _TOKENIZER_GLOBS:
        found.update(p for p in folder.glob(pattern) if p.is_file())
    return sorted(found)


def cache_key(components: Mapping[str, Any]) -> str:
    """The entry name for these key components (a JSON-able mapping) plus the tokenization version."""
    text = json.dumps({"version": TOKENIZATION_VERSION, **components}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# --------------------------------------------------------------------------- reading


class RaggedColumn(Sequence[np.ndarray]):
    """Rows of a list<int32> column spread over record batches, read lazily from a memory map.

    ``column[i]`` is a 1-D int32 view into the mapped file; only the pages of
    the rows actually read are ever loaded.
    """

    def __init__(self, batches: Sequence[tuple[np.ndarray, np.ndarray]]) -> None:
        self._batches = list(batches)  # (offsets, values) per record batch
        counts = [len(offsets) - 1 for offsets, _ in self._batches]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    @overload
    def __getitem__(self, index: int) -> np.ndarray: ...
    @overload
    def __getitem__(self, index: slice) -> list[np.ndarray]: ...
    def __getitem__(self, index: int | slice) -> np.ndarray | list[np.ndarray]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        i = int(index) + (len(self) if index < 0 else 0)
        if not 0 <= i < len(self):
            raise IndexError(index)
        batch = int(np.searchsorted(self._starts, i, side="right")) - 1
        offsets, values = self._batches[batch]
        row = i - int(self._starts[batch])
        return values[offsets[row] : offsets[row + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for offsets, values in self._batches:
            for row in range(len(offsets) - 1):
                yield values[offsets[row] : offsets[row + 1]]

    def lengths(self) -> np.ndarray:
        """Row lengths from the offsets alone (the token pages are not touched)."""
        if not self._batches:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(offsets).astype(np.int64) for offsets, _ in self._batches])


def read_split(path: Path, *, truncated: int, dropped: int, supervised: int) -> TokenizedSplit:
    """A :class:`TokenizedSplit` whose rows are views into the memory-mapped Arrow file at ``path``."""
    import pyarrow as pa

    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    columns: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"input_ids": [], "labels": []}
    roles: list[np.ndarray] | None = [] if reader.schema.get_field_index("roles") >= 0 else None
    for b in range(reader.num_record_batches):
        batch = reader.get_batch(b)
        for name, parts in columns.items():
            array = batch.column(name)
            parts.append((array.offsets.to_numpy(), array.values.to_numpy(zero_copy_only=True)))
        if roles is not None:
            roles.append(batch.column("roles").to_numpy())
    ids, labels = RaggedColumn(columns["input_ids"]), RaggedColumn(columns["labels"])
    lengths = ids.lengths()
    if not np.array_equal(lengths, labels.lengths()):
        raise ValueError(f"{path}: input_ids and labels rows differ in length")
    split = TokenizedSplit(
        ids, labels, truncated=truncated, dropped=dropped, known_lengths=lengths, known_supervised=supervised
    )
    if roles is not None:
        split.roles = np.concatenate(roles).astype(np.int8) if roles else np.zeros(0, dtype=np.int8)
    return split


@dataclass
class CachedSplits:
    """A cache entry opened for reading (or just written)."""

    key: str
    train: TokenizedSplit
    valid: TokenizedSplit | None
    meta: dict[str, Any]


def load_entry(key: str, root: Path | None = None) -> CachedSplits | None:
    """The entry for ``key``, or None when there is none or it can't be read (it is then removed)."""
    return _read_entry((root or cache_root()) / key, key)


def _read_entry(folder: Path, key: str) -> CachedSplits | None:
    if not folder.is_dir():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        splits = {name: _open_split(folder, name, meta) for name in _SPLITS if name in meta["splits"]}
        if meta.get("key") != key or "train" not in splits:
            raise ValueError("meta.json does not describe this entry")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _discard(folder, exc)
        return None
    return CachedSplits(key, splits["train"], splits.get("valid"), meta)


def _open_split(folder: Path, name: str, meta: dict[str, Any]) -> TokenizedSplit:
    info = meta["splits"][name]
    split = read_split(
        folder / f"{name}.arrow",
        truncated=int(info["truncated"]),
        dropped=int(info["dropped"]),
        supervised=int(info["supervised_tokens"]),
    )
    if len(split) != int(info["rows"]):
        raise ValueError(f"{name}.arrow holds {len(split)} rows, meta.json says {info['rows']}")
    return split


def _discard(folder: Path, reason: BaseException) -> None:
    """Move a broken entry out of the way (a rename is atomic; the delete may then fail harmlessly)."""
    import logging

    logging.getLogger(__name__).warning("ignoring unreadable tokenization cache entry %s (%s)", folder, reason)
    trash = folder.with_name(f".trash-{folder.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.replace(folder, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


# --------------------------------------------------------------------------- writing


@dataclass
class TokenizedChunk:
    """Tokenized rows of one chunk of records, flattened: what workers send back."""

    ids: np.ndarray  # int32, all rows concatenated
    labels: np.ndarray  # int32, same layout
    lengths: np.ndarray  # int64, one per row
    truncated: int
    dropped: int
    roles: np.ndarray | None = None  # int8, one per row: preference data only

    @classmethod
    def from_split(cls, split: TokenizedSplit) -> TokenizedChunk:
        """Flatten an in-memory split."""
        ids = list(split.input_ids)
        empty = np.zeros(0, dtype=np.int32)
        return cls(
            ids=np.concatenate(ids).astype(np.int32, copy=False) if ids else empty,
            labels=np.concatenate(list(split.labels)).astype(np.int32, copy=False) if ids else empty,
            lengths=split.lengths,
            truncated=split.truncated,
            dropped=split.dropped,
            roles=split.roles,
        )


class SplitWriter:
    """Appends tokenized chunks to an Arrow IPC file as record batches, keeping the split's counts."""

    def __init__(self, path: Path) -> None:
        import pyarrow as pa

        self._pa = pa
        self.path = path
        self._schema: Any = None  # set by the first rows written: with a roles column for preference data
        self._sink: Any = None
        self._writer: Any = None
        self.rows = self.truncated = self.dropped = self.supervised = 0

    def _open(self, roles: bool) -> None:
        pa = self._pa
        fields = [("input_ids", pa.large_list(pa.int32())), ("labels", pa.large_list(pa.int32()))]
        self._schema = pa.schema(fields + ([("roles", pa.int8())] if roles else []))
        self._sink = pa.OSFile(str(self.path), "wb")
        self._writer = pa.ipc.new_file(self._sink, self._schema)

    def write(self, chunk: TokenizedChunk) -> None:
        """Append one chunk (an empty one only updates the counts)."""
        pa = self._pa
        self.truncated += chunk.truncated
        self.dropped += chunk.dropped
        if not len(chunk.lengths):
            return
        if self._writer is None:
            self._open(chunk.roles is not None)
        offsets = pa.array(np.concatenate([[0], np.cumsum(chunk.lengths)]).astype(np.int64))
        columns = [
            pa.LargeListArray.from_arrays(offsets, pa.array(chunk.ids, type=pa.int32())),
            pa.LargeListArray.from_arrays(offsets, pa.array(chunk.labels, type=pa.int32())),
        ]
        if self._schema.get_field_index("roles") >= 0:
            roles = chunk.roles if chunk.roles is not None else np.zeros(len(chunk.lengths), dtype=np.int8)
            columns.append(pa.array(roles.astype(np.int8), type=pa.int8()))
        self._writer.write_batch(pa.record_batch(columns, schema=self._schema))
        self.rows += len(chunk.lengths)
        self.supervised += _supervised(chunk)

    def close(self) -> dict[str, int]:
        """Finish the file; returns what ``meta.json`` records about the split."""
        if self._writer is None:  # no rows at all: an empty file of the plain layout
            self._open(roles=False)
        self._writer.close()
        self._sink.close()
        return {
            "rows": self.rows,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "supervised_tokens": self.supervised,
        }


def _supervised(chunk: TokenizedChunk) -> int:
    """Labels that carry loss, not counting each row's first (it predicts nothing)."""
    firsts = np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]])
    trained = chunk.labels != IGNORE
    return int(trained.sum() - trained[firsts].sum())


class EntryBuilder:
    """Builds a cache entry in a temporary folder; :meth:`commit` renames it to its key."""

    def __init__(self, key: str, root: Path | None = None) -> None:
        self.key = key
        self.root = root or cache_root()
        self.root.mkdir(parents=True, exist_ok=True)
        self.folder = self.root / f".tmp-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.folder.mkdir()
        self.writers: dict[str, SplitWriter] = {}

    def writer(self, split: str) -> SplitWriter:
        """The writer of ``train`` or ``valid`` (created on first use)."""
        if split not in self.writers:
            self.writers[split] = SplitWriter(self.folder / f"{split}.arrow")
        return self.writers[split]

    def commit(self, meta: Mapping[str, Any], *, keep: bool = True) -> CachedSplits:
        """Close the files, write ``meta.json`` and open the entry (memory-mapped).

        With ``keep=False`` (``data.cache: false``) the files are mapped and then
        deleted: the mapping keeps them readable, and nothing is left behind.
        """
        full = {**meta, "key": self.key, "splits": {name: w.close() for name, w in self.writers.items()}}
        (self.folder / "meta.json").write_text(json.dumps(full, indent=1, default=str), encoding="utf-8")
        if not keep:
            entry = _read_entry(self.folder, self.key)
            shutil.rmtree(self.folder, ignore_errors=True)
            if entry is None:  # pragma: no cover - we just wrote it
                raise RuntimeError(f"could not read back the tokenized data in {self.folder}")
            return entry
        final = self.root / self.key
        try:
            os.replace(self.folder, final)
        except OSError:  # another process committed the same key first: theirs is as good as ours
            shutil.rmtree(self.folder, ignore_errors=True)
        entry = load_entry(self.key, self.root)
        if entry is None:  # pragma: no cover - the entry was removed under us
            raise RuntimeError(f"could not read back the tokenized data in {final}")
        return entry

    def abort(self) -> None:
        """Drop the half-built entry."""
        for w in self.writers.values():
            with contextlib.suppress(Exception):  # already failing; the folder goes anyway
                w.close()
        shutil.rmtree(self.folder, ignore_errors=True)


# --------------------------------------------------------------------------- housekeeping


@dataclass(frozen=True)
class EntryInfo:
    """One cache entry on disk (``rows`` is None for an unreadable or half-built one)."""

    key: str
    size_bytes: int
    rows: dict[str, int] | None
    modified: float


def list_entries(root: Path | None = None) -> list[EntryInfo]:
    """Every entry under the cache root (leftovers of interrupted builds included), newest first."""
    root = root or cache_root()
    if not root.is_dir():
        return []
    out = []
    for folder in root.iterdir():
        if not folder.is_dir():
            continue
        files = [p for p in folder.rglob("*") if p.is_file()]
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
            rows: dict[str, int] | None = {name: int(info["rows"]) for name, info in meta["splits"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            rows = None
        size = sum(p.stat().st_size for p in files)
        out.append(EntryInfo(folder.name, size, rows, folder.stat().st_mtime))
    return sorted(out, key=lambda e: e.modified, reverse=True)


def clear_entries(root: Path | None = None) -> tuple[int, int]:
    """Delete every entry; returns ``(entries, bytes)`` freed.  Runs reading an entry keep their mapping."""
    entries = list_entries(root)
    root = root or cache_root()
    for entry in entries:
        shutil.rmtree(root / entry.key, ignore_errors=True)
    return len(entries), sum(e.size_bytes for e in entries)
