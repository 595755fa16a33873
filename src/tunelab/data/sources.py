"""Find dataset files and stream their records with the line they came from.

JSONL and CSV are read by our own streaming readers so every problem can name
the exact file and line; Parquet, Arrow and HDF5 tables are read a block of
rows at a time by `tables.py` (their rows are numbered instead), and hub
datasets (or local dataset folders) go through ``datasets.load_dataset``.
``data.columns`` renaming happens here, so nothing downstream sees the file's
own field names.  Nothing here interprets a record: that is `formats.py`'s job.

Every record is bounded in size (``TUNELAB_MAX_RECORD_MB``, see settings):
tokenizing one costs about 200 times its bytes in memory, so a single 50 MB
line would otherwise take ~9 GiB before anything could say it is too long.
Line-based files are read a bounded line at a time, so an oversized line is
refused after reading at most the limit.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data import tables
from tunelab.errors import DataError
from tunelab.settings import get_settings

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".feather", ".h5", ".hdf5")
_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev", "eval", "test")}
# Files that mark a folder as a dataset `datasets.load_dataset` understands (a hub repo checked out locally).
_DATASET_FOLDER_MARKERS = ("README.md", "data")


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    path: str
    line: int


def resolve_files(train: str, valid: str | None) -> tuple[Path | str, Path | str | None]:
    """Map ``data.train``/``data.valid`` to concrete files (or a hub name).

    A folder must hold a ``train.*`` file and may hold ``valid.*`` (or
    validation/val/dev/eval/test) in one of the supported formats; a folder
    without one but laid out as a hub dataset (a README.md card or a data/
    folder) is returned as a name for ``datasets.load_dataset``.
    """
    train_path = Path(train).expanduser()
    if train_path.is_dir():
        found_train = _find_split(train_path, "train")
        if found_train is None and _is_dataset_folder(train_path):
            return str(train_path), (_existing(valid, "data.valid") if valid else None)
        if found_train is None:
            raise DataError(
                f"folder {train_path} has no train file",
                hint=f"put a train{{{','.join(SUFFIXES)}}} file in it, point data.train at a file, "
                "or lay it out as a hub dataset (README.md card or data/ folder)",
            )
        if valid:
            return found_train, _existing(valid, "data.valid")
        return found_train, _find_split(train_path, "valid")
    if not train_path.exists() and not _looks_like_hub_name(train):
        raise DataError(f"data.train: {train} does not exist", hint="give a file, a folder or a hub dataset name")
    return (train_path if train_path.exists() else train), (_existing(valid, "data.valid") if valid else None)


def _existing(name: str, key: str) -> Path | str:
    """A local path that exists, or a hub dataset name; anything else is a clear error."""
    path = Path(name).expanduser()
    if path.exists():
        return path
    if _looks_like_hub_name(name):
        return name
    raise DataError(f"{key}: {name} does not exist", hint="give a file, a folder or a hub dataset name")


def iter_records(
    source: Path | str,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    subset: str | None = None,
    max_record_bytes: int | None = None,
) -> Iterator[Record]:
    """Stream the records of a file (or hub dataset), validating as it goes.

    Files are read a line (JSONL, CSV) or a block of rows (Parquet, Arrow,
    HDF5) at a time; only JSON arrays are loaded whole.  ``split`` and
    ``subset`` pick what a hub dataset (or an HDF5 file with several tables)
    yields.  ``columns`` maps tunelab's field names to the file's
    (``{"prompt": "question"}``) and is applied to every record before anything
    looks at it.  A source with no record at all raises :class:`DataError`, and
    so does a record over ``max_record_bytes`` (default: the settings' limit).
    """
    mapping = dict(columns or {})
    limit = max_record_bytes or get_settings().max_record_bytes
    count = 0
    for record in _iter_raw(source, split, subset, limit):
        count += 1
        yield _renamed(record, mapping) if mapping else record
    if count == 0:
        raise DataError("the file holds no records", path=str(source), hint="add at least one example")


def read_records(
    source: Path | str,
    *,
    split: str = "train",
    columns: Mapping[str, str] | None = None,
    subset: str | None = None,
    max_record_bytes: int | None = None,
) -> list[Record]:
    """Read every record of a file (or hub dataset) into a list; see :func:`iter_records`."""
    records = iter_records(source, split=split, columns=columns, subset=subset, max_record_bytes=max_record_bytes)
    return list(records)


def _iter_raw(source: Path | str, split: str, subset: str | None, limit: int) -> Iterator[Record]:
    if isinstance(source, str) or not source.is_file():
        for record in _read_hub(str(source), split, subset):
            yield _checked(record, limit)
        return
    suffix = source.suffix.lower()
    if source.stat().st_size == 0:
        raise DataError("the file is empty", path=str(source), hint="add at least one example")
    line_reader = _LINE_READERS.get(suffix)
    if line_reader is not None:
        yield from line_reader(source, limit)
        return
    rows = _table_rows(source, suffix, split)
    if rows is None:
        raise DataError(
            f"unsupported file type {suffix or '(none)'}",
            path=str(source),
            hint=f"use one of {', '.join(SUFFIXES)}",
        )
    for number, row in enumerate(rows, start=1):
        yield _checked(Record(row, str(source), number), limit)


def _checked(record: Record, limit: int) -> Record:
    """A parsed record (JSON array item, table row, hub row) whose text is within ``limit``."""
    size = _text_size(record.data)
    if size > limit:
        raise _too_big(record.path, record.line, f"holds about {size:,} bytes of text, more than", limit)
    return record


def _text_size(value: Any) -> int:
    """Characters of every string (and bytes of every blob) in a record: its size, cheaply, without encoding."""
    total, stack = 0, [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str | bytes | bytearray):
            total += len(item)
        elif isinstance(item, Mapping):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        else:
            total += 8  # a number, bool or null
    return total


def _too_big(path: Path | str, line: int, what: str, limit: int) -> DataError:
    return DataError(
        f"this record {what} the limit of {limit:,} bytes ({limit / 2**20:.3g} MiB) per record",
        path=str(path),
        line=line,
        hint="split it into smaller examples, or raise the limit with the environment variable TUNELAB_MAX_RECORD_MB",
    )


def _bounded_lines(fh: Any, path: Path, limit: int) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` pairs; a line longer than ``limit`` is refused after reading ``limit`` bytes."""
    number = 0
    while raw := fh.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise _too_big(path, number, "is longer than", limit)
        yield number, raw


def _table_rows(path: Path, suffix: str, split: str) -> Iterator[dict[str, Any]] | None:
    if suffix == ".parquet":
        return tables.iter_parquet(path)
    if suffix in (".arrow", ".feather"):
        return tables.iter_arrow(path)
    if suffix in (".h5", ".hdf5"):
        return tables.iter_hdf5(path, split)
    return None


def _renamed(record: Record, mapping: dict[str, str]) -> Record:
    """Apply ``data.columns`` ({tunelab field: file field}) to one record."""
    data = dict(record.data)
    for ours, theirs in mapping.items():
        if theirs not in record.data:
            raise DataError(
                f"data.columns.{ours} names the field {theirs!r}, which this record does not have "
                f"(it has {', '.join(map(repr, sorted(record.data))) or 'no fields'})",
                path=record.path,
                line=record.line,
                hint=f"set data.columns.{ours} to one of the fields above",
            )
        # Read from the original record: two mappings may swap or share fields.
        data.pop(theirs, None)
    for ours, theirs in mapping.items():
        data[ours] = record.data[theirs]
    return Record(data, record.path, record.line)


def content_hash(paths: list[Path | str | None]) -> str:
    """sha256 over the bytes of every local file or dataset folder (hub names hash by name): the dataset's identity."""
    digest = hashlib.sha256()
    for item in paths:
        local = Path(item).expanduser() if item is not None else None
        if item is None:
            digest.update(b"\0none")
        elif local is not None and local.is_file():
            _hash_file(digest, local)
        elif local is not None and local.is_dir():
            for child in sorted(p for p in local.rglob("*") if p.is_file()):
                digest.update(child.relative_to(local).as_posix().encode() + b"\0")
                _hash_file(digest, child)
        else:
            digest.update(str(item).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)


def _read_jsonl(path: Path, limit: int) -> Iterator[Record]:
    with path.open("rb") as fh:
        for number, raw in _bounded_lines(fh, path, limit):
            text = _decode(raw, path, number)
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"not valid JSON ({exc.msg}, column {exc.colno})", path=str(path), line=number
                ) from None
            if not isinstance(value, dict):
                raise DataError(
                    f"each line must be a JSON object, got {type(value).__name__}", path=str(path), line=number
                )
            yield Record(value, str(path), number)


def _read_json(path: Path, limit: int) -> Iterator[Record]:
    text = _decode(path.read_bytes(), path, None)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", path=str(path), line=exc.lineno) from None
    wrapped = isinstance(value, dict)
    if wrapped:
        # {"data": [...]} or {"train": [...]} wrappers are common exports.
        lists = [v for v in value.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError("expected a JSON array of objects", path=str(path), line=1)
        value = lists[0]
    if not isinstance(value, list):
        raise DataError("expected a JSON array of objects", path=str(path), line=1)
    line_of = _json_item_lines(text, len(value), wrapped=wrapped)
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise DataError(f"item {index} must be an object", path=str(path), line=line_of[index])
        yield _checked(Record(item, str(path), line_of[index]), limit)


def _json_item_lines(text: str, count: int, *, wrapped: bool) -> list[int]:
    """The line on which each item of the records array starts.

    Scans the text once, tracking strings (with escapes) and a stack of open
    containers; an item is an object whose parent is the records array: the
    top-level array, or for ``{"data": [...]}`` the array one level down.
    """
    lines: list[int] = []
    stack: list[str] = []
    line, in_str, escape = 1, False, False
    target_depth = 2 if wrapped else 1
    for ch in text:
        if ch == "\n":
            line += 1
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
            continue
        if ch == '"':
            in_str = True
        elif ch in "[{":
            if ch == "{" and len(stack) == target_depth and stack[-1] == "[":
                lines.append(line)
            stack.append(ch)
        elif ch in "]}" and stack:
            stack.pop()
    lines += [1] * (count - len(lines))
    return lines


def _read_csv(path: Path, limit: int) -> Iterator[Record]:
    # The per-record bound below replaces csv's own 128 KiB field limit (which raises a bare csv.Error).
    csv.field_size_limit(max(csv.field_size_limit(), limit))
    state = {"start": 1, "pending": 0}  # the current record's first line, and its bytes read so far

    def lines(fh: Any) -> Iterator[str]:
        # Decoded line by line: a bad byte is reported on its own line and the file is never loaded whole;
        # a quoted field spanning lines is refused as soon as its record passes the limit.
        for number, raw in _bounded_lines(fh, path, limit):
            state["pending"] += len(raw)
            if state["pending"] > limit:
                raise _too_big(path, state["start"], "spans more bytes than", limit)
            yield _decode(raw, path, number)

    with path.open("rb") as fh:
        reader = csv.DictReader(lines(fh))
        try:
            if not reader.fieldnames:
                raise DataError("CSV has no header row", path=str(path), line=1)
            state.update(start=2, pending=0)
            for row in reader:
                if None in row:
                    raise DataError("row has more fields than the header", path=str(path), line=state["start"])
                record = Record(dict(row), str(path), state["start"])
                state.update(start=reader.line_num + 1, pending=0)
                yield record
        except csv.Error as exc:
            raise DataError(f"not valid CSV ({exc})", path=str(path), line=state["start"]) from None


def _read_hub(name: str, split: str, subset: str | None) -> Iterator[Record]:
    """A hub dataset by name, or a local dataset folder; both go through ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError(f"{name}: not a local file and the `datasets` package is missing") from None
    local = Path(name).expanduser().is_dir()
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types (network, missing split, bad config)
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        what = "dataset folder" if local else "hub dataset"
        raise DataError(
            f"{name}: could not be loaded as a {what} (split {split!r}, subset {subset!r}): {reason}",
            hint="check data.split and data.subset"
            + ("" if local else ", the dataset name, and that this machine is online"),
        ) from None
    for index, row in enumerate(ds):
        yield Record(dict(row), name, index + 1)


def _decode(raw: bytes, path: Path, line: int | None) -> str:
    try:
        return raw.decode("utf-8-sig" if line in (None, 1) else "utf-8")
    except UnicodeDecodeError as exc:
        if line is None:
            line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"bytes that are not UTF-8 (byte {exc.start}: {raw[exc.start : exc.start + 1]!r})",
            path=str(path),
            line=line,
            hint="re-save the file as UTF-8",
        ) from None


def _find_split(folder: Path, split: str) -> Path | None:
    for stem in _SPLIT_NAMES[split]:
        for suffix in SUFFIXES:
            candidate = folder / f"{stem}{suffix}"
            if candidate.is_file():
                return candidate
    return None


def _is_dataset_folder(folder: Path) -> bool:
    """A folder laid out for ``load_dataset`` (card with configs, or a data/ folder) rather than train/valid files."""
    return any((folder / marker).exists() for marker in _DATASET_FOLDER_MARKERS)


def _looks_like_hub_name(text: str) -> bool:
    """``owner/name`` with no file suffix: ``data/trian.jsonl`` is a typo'd path, not a hub dataset."""
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "/", "~")):
        return False
    return not text.lower().endswith(SUFFIXES)


_LINE_READERS: dict[str, Callable[[Path, int], Iterator[Record]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".csv": _read_csv,
}
