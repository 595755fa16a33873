"""Find dataset files and stream their records with the line they came from.

JSONL and CSV are read by our own streaming readers so every problem can name
the exact file and line; Parquet, Arrow and HDF5 tables are read a block of
rows at a time by `columnar.py` (their rows are numbered instead), and hub
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

import hashlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from tunelab.data import columnar
from tunelab.data.readers import OnBad, Record, checked, read_csv, read_hub, read_json, read_jsonl
from tunelab.errors import DataError
from tunelab.settings import get_settings

SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".feather", ".h5", ".hdf5")
_SPLIT_NAMES = {"train": ("train",), "valid": ("valid", "validation", "val", "dev", "eval", "test")}
# Files that mark a folder as a dataset `datasets.load_dataset` understands (a hub repo checked out locally).
_DATASET_FOLDER_MARKERS = ("README.md", "data")


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
    on_bad: OnBad | None = None,
) -> Iterator[Record]:
    """Stream the records of a file (or hub dataset), validating as it goes.

    Files are read a line (JSONL, CSV) or a block of rows (Parquet, Arrow,
    HDF5) at a time; only JSON arrays are loaded whole.  ``split`` and
    ``subset`` pick what a hub dataset (or an HDF5 file with several tables)
    yields.  ``columns`` maps tunelab's field names to the file's
    (``{"prompt": "question"}``) and is applied to every record before anything
    looks at it.  A source with no record at all raises :class:`DataError`, and
    so does a record over ``max_record_bytes`` (default: the settings' limit).  With ``on_bad``, a
    line-level problem of a JSONL, JSON or CSV file (not UTF-8, not JSON, not an object, too many fields)
    is reported there and the line skipped, so a validator can list them all in one pass.
    """
    mapping = dict(columns or {})
    limit = max_record_bytes or get_settings().max_record_bytes
    count, bad = 0, 0

    def report(exc: DataError) -> None:
        nonlocal bad
        bad += 1
        assert on_bad is not None
        on_bad(exc)

    for record in _iter_raw(source, split, subset, limit, report if on_bad else None):
        count += 1
        yield _renamed(record, mapping) if mapping else record
    if count == 0 and bad == 0:
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


def _iter_raw(source: Path | str, split: str, subset: str | None, limit: int, on_bad: OnBad | None) -> Iterator[Record]:
    if isinstance(source, str) or not source.is_file():
        for record in read_hub(str(source), split, subset):
            yield checked(record, limit)
        return
    suffix = source.suffix.lower()
    if source.stat().st_size == 0:
        raise DataError("the file is empty", path=str(source), hint="add at least one example")
    line_reader = _LINE_READERS.get(suffix)
    if line_reader is not None:
        yield from line_reader(source, limit, on_bad)
        return
    rows = _table_rows(source, suffix, split)
    if rows is None:
        raise DataError(
            f"unsupported file type {suffix or '(none)'}",
            path=str(source),
            hint=f"use one of {', '.join(SUFFIXES)}",
        )
    for number, row in enumerate(rows, start=1):
        yield checked(Record(row, str(source), number), limit)


def _table_rows(path: Path, suffix: str, split: str) -> Iterator[dict[str, Any]] | None:
    if suffix == ".parquet":
        return columnar.iter_parquet(path)
    if suffix in (".arrow", ".feather"):
        return columnar.iter_arrow(path)
    if suffix in (".h5", ".hdf5"):
        return columnar.iter_hdf5(path, split)
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


_LINE_READERS: dict[str, Callable[[Path, int, OnBad | None], Iterator[Record]]] = {
    ".jsonl": read_jsonl,
    ".json": read_json,
    ".csv": read_csv,
}
