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
The file layout of one split (its columns, writer and memory-mapped reader) is
:mod:`tunelab.data.arrow_split`; this module owns keys, entries and their folders.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.arrow_split import SplitWriter, read_split
from tunelab.data.tokenize import TokenizedSplit
from tunelab.settings import get_settings

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
