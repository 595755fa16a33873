"""Find dataset files and read their records with the line they came from.

JSONL and CSV are read by our own streaming readers so every problem can name
the exact file and line; Parquet and hub datasets go through `datasets` /
pyarrow (their rows are numbered instead).  Nothing here interprets a record:
that is `formats.py`'s job.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev", "eval", "test")}


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    path: str
    line: int


def resolve_files(train: str, valid: str | None) -> tuple[Path | str, Path | str | None]:
    """Map ``data.train``/``data.valid`` to concrete files (or a hub name).

    A folder must hold a ``train.*`` file and may hold ``valid.*`` (or
    validation/val/dev/eval/test) in one of the supported formats.
    """
    train_path = Path(train).expanduser()
    if train_path.is_dir():
        found_train = _find_split(train_path, "train")
        if found_train is None:
            raise DataError(
                f"folder {train_path} has no train file",
                hint=f"put a train{{{','.join(SUFFIXES)}}} file in it, or point data.train at a file",
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


def read_records(source: Path | str, *, split: str = "train") -> list[Record]:
    """Read every record of a file (or hub dataset); refuse unreadable input with file and line."""
    if isinstance(source, str) or not source.exists():
        return _read_hub(str(source), split)
    suffix = source.suffix.lower()
    if source.stat().st_size == 0:
        raise DataError("the file is empty", path=str(source), hint="add at least one example")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(suffix)
    if reader is None:
        raise DataError(
            f"unsupported file type {suffix or '(none)'}",
            path=str(source),
            hint=f"use one of {', '.join(SUFFIXES)}",
        )
    records = list(reader(source))
    if not records:
        raise DataError("the file holds no records", path=str(source), hint="add at least one example")
    return records


def content_hash(paths: list[Path | str | None]) -> str:
    """sha256 over the bytes of every local file (hub names hash by name): the dataset's identity."""
    digest = hashlib.sha256()
    for item in paths:
        if item is None:
            digest.update(b"\0none")
        elif isinstance(item, Path) and item.is_file():
            with item.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):
                    digest.update(chunk)
        else:
            digest.update(str(item).encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _read_jsonl(path: Path) -> Iterator[Record]:
    with path.open("rb") as fh:
        for number, raw in enumerate(fh, start=1):
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


def _read_json(path: Path) -> Iterator[Record]:
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
        yield Record(item, str(path), line_of[index])


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


def _read_csv(path: Path) -> Iterator[Record]:
    text = _decode(path.read_bytes(), path, None)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames:
        raise DataError("CSV has no header row", path=str(path), line=1)
    start = 2
    for row in reader:
        if None in row:
            raise DataError("row has more fields than the header", path=str(path), line=start)
        yield Record({k: v for k, v in row.items()}, str(path), start)
        start = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise DataError(f"not a readable Parquet file ({exc})", path=str(path)) from None
    for index, row in enumerate(table.to_pylist()):
        yield Record(row, str(path), index + 1)


def _read_hub(name: str, split: str) -> list[Record]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError(f"{name}: not a local file and the `datasets` package is missing") from None
    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:
        raise DataError(
            f"{name}: not a local path and could not be loaded from the hub ({type(exc).__name__})",
            hint="check the path, or connect to the internet for hub datasets",
        ) from None
    return [Record(dict(row), name, i + 1) for i, row in enumerate(ds)]


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


def _looks_like_hub_name(text: str) -> bool:
    """``owner/name`` with no file suffix: ``data/trian.jsonl`` is a typo'd path, not a hub dataset."""
    parts = text.split("/")
    if len(parts) != 2 or not all(parts) or text.startswith((".", "/", "~")):
        return False
    return not text.lower().endswith(SUFFIXES)
