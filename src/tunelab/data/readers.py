"""Streaming readers for JSONL, JSON and CSV files (and hub datasets), each record with the line it came from.

A line is read a bounded number of bytes at a time, so an oversized record is refused after reading
at most the limit, naming its file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import DataError


@dataclass(frozen=True)
class Record:
    """One raw example and where it came from (for error messages)."""

    data: dict[str, Any]
    path: str
    line: int


def too_big(path: Path | str, line: int, what: str, limit: int) -> DataError:
    return DataError(
        f"this record {what} the limit of {limit:,} bytes ({limit / 2**20:.3g} MiB) per record",
        path=str(path),
        line=line,
        hint="split it into smaller examples, or raise the limit with the environment variable TUNELAB_MAX_RECORD_MB",
    )


def too_deep(path: Path | str, line: int | None) -> DataError:
    """Lists or objects nested past what the JSON parser follows (a record is only a few levels deep)."""
    return DataError("nested too deeply to read: a record is objects, lists and strings a few levels deep",
                     path=str(path), line=line)  # fmt: skip


def _bounded_lines(fh: Any, path: Path, limit: int) -> Iterator[tuple[int, bytes]]:
    """``(line number, raw line)`` pairs; a line longer than ``limit`` is refused after reading ``limit`` bytes."""
    number = 0
    while raw := fh.readline(limit + 1):
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            raise too_big(path, number, "is longer than", limit)
        yield number, raw


OnBad = Callable[[DataError], None]
"""Where a reader reports a bad line it can step over (validation lists them all); without one, it raises."""


def _raise(exc: DataError) -> None:
    raise exc


def read_jsonl(path: Path, limit: int, on_bad: OnBad | None = None) -> Iterator[Record]:
    """The objects of a JSON Lines file; a line that is not UTF-8, not JSON or not an object goes to ``on_bad``.

    Each line stands alone, so a bad one can be reported and skipped and the rest still read: ``data
    validate`` lists every bad line in one pass instead of stopping at the first.  A line over ``limit``
    always raises (the reader would otherwise resume mid-line).
    """
    report = on_bad or _raise
    with path.open("rb") as fh:
        for number, raw in _bounded_lines(fh, path, limit):
            try:
                value = _json_line(raw, path, number)
            except DataError as exc:
                report(exc)
                continue
            if value is not None:
                yield Record(value, str(path), number)


def _json_line(raw: bytes, path: Path, number: int) -> dict[str, Any] | None:
    """One JSONL line parsed: an object, ``None`` for a blank line, or a :class:`DataError` saying what's wrong."""
    text = decode(raw, path, number)
    if not text.strip():
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg}, column {exc.colno})", path=str(path), line=number) from None
    except RecursionError:
        raise too_deep(path, number) from None
    if not isinstance(value, dict):
        raise DataError(f"each line must be a JSON object, got {type(value).__name__}", path=str(path), line=number)
    return value


def read_json(path: Path, limit: int, on_bad: OnBad | None = None) -> Iterator[Record]:
    text = decode(path.read_bytes(), path, None)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"not valid JSON ({exc.msg})", path=str(path), line=exc.lineno) from None
    except RecursionError:
        raise too_deep(path, None) from None
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
            (on_bad or _raise)(DataError(f"item {index} must be an object", path=str(path), line=line_of[index]))
            continue
        yield checked(Record(item, str(path), line_of[index]), limit)


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


def read_csv(path: Path, limit: int, on_bad: OnBad | None = None) -> Iterator[Record]:
    # The per-record bound below replaces csv's own 128 KiB field limit (which raises a bare csv.Error).
    csv.field_size_limit(max(csv.field_size_limit(), limit))
    state = {"start": 1, "pending": 0}  # the current record's first line, and its bytes read so far

    def lines(fh: Any) -> Iterator[str]:
        # Decoded line by line: a bad byte is reported on its own line and the file is never loaded whole;
        # a quoted field spanning lines is refused as soon as its record passes the limit.
        for number, raw in _bounded_lines(fh, path, limit):
            state["pending"] += len(raw)
            if state["pending"] > limit:
                raise too_big(path, state["start"], "spans more bytes than", limit)
            yield decode(raw, path, number)

    with path.open("rb") as fh:
        reader = csv.DictReader(lines(fh))
        try:
            if not reader.fieldnames:
                raise DataError("CSV has no header row", path=str(path), line=1)
            state.update(start=2, pending=0)
            for row in reader:
                record = Record(dict(row), str(path), state["start"])
                state.update(start=reader.line_num + 1, pending=0)
                if None in row:
                    extra = DataError("row has more fields than the header", path=record.path, line=record.line)
                    (on_bad or _raise)(extra)
                    continue
                yield record
        except csv.Error as exc:
            raise DataError(f"not valid CSV ({exc})", path=str(path), line=state["start"]) from None


def read_hub(name: str, split: str, subset: str | None) -> Iterator[Record]:
    """A hub dataset by name, or a local dataset folder; both go through ``datasets.load_dataset``."""
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a core dependency
        raise DataError(f"{name}: not a local file and the `datasets` package is missing") from None
    from tunelab.hub import hub_reachable

    local = Path(name).expanduser().is_dir()
    # Without the hub, datasets retries a name lookup for ~25 s before it tries its cache: go to the cache at once.
    cache_only = not local and not hub_reachable()
    was = datasets.config.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = was or cache_only
    try:
        ds = datasets.load_dataset(name, subset, split=split)
    except Exception as exc:  # datasets raises many types (network, missing split, bad config)
        text = str(exc).strip()
        reason = text.splitlines()[0] if text else type(exc).__name__
        what = "dataset folder" if local else "hub dataset"
        offline = " (the hub can't be reached from here, so only the local cache was looked in)" if cache_only else ""
        raise DataError(
            f"{name}: could not be loaded as a {what} (split {split!r}, subset {subset!r}){offline}: {reason}",
            hint="check data.split and data.subset"
            + ("" if local else ", the dataset name, and that this machine is online"),
        ) from None
    finally:
        datasets.config.HF_HUB_OFFLINE = was
    for index, row in enumerate(ds):
        yield Record(dict(row), name, index + 1)


def decode(raw: bytes, path: Path, line: int | None) -> str:
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


def checked(record: Record, limit: int) -> Record:
    """A parsed record (JSON array item, table row, hub row) whose text is within ``limit``."""
    size = text_size(record.data)
    if size > limit:
        raise too_big(record.path, record.line, f"holds about {size:,} bytes of text, more than", limit)
    return record


def text_size(value: Any) -> int:
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
