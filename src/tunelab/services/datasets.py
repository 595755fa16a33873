"""Datasets: validate and preview them as training reads them, upload them, and the tokenization cache."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.jobs.processes import process_exists
from tunelab.services.views import CacheCleared, CacheEntry, DatasetReport, UploadedDataset
from tunelab.settings import get_settings
from tunelab.vocab import UPLOAD_SUFFIXES

if TYPE_CHECKING:
    from tunelab.data.preview import Preview


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
) -> DatasetReport:
    """Run the checks training runs on every record and summarise; one DataError lists every bad record, by kind.

    With ``model`` also token lengths, a histogram and truncation, tokenized exactly as training does.
    """
    from tunelab.data.validate import validate_dataset as validate

    report = validate(
        path,
        valid=valid,
        fmt=fmt,
        model=model,
        max_seq_len=max_seq_len,
        mask_prompt=mask_prompt,
        train_on=train_on,
        columns=columns,
        split=split,
        subset=subset,
    )
    return DatasetReport(**report)


def preview_dataset(path: str, *, model: str, n: int = 3, **options: Any) -> Preview:
    """The first ``n`` examples exactly as the trainer sees them, each token marked trained or not.

    Returns a ``Preview`` (``format``, ``chat_template``, ``note``, ``examples`` with their
    ``tokens`` as ``(text, id, trained)``); ``options`` are those of :func:`validate_dataset`.
    """
    from tunelab.data.preview import preview_dataset as preview

    return preview(path, model=model, n=n, **options)


def cache_root() -> Path:
    """Where tokenized datasets are cached (``$TUNELAB_HOME/cache/tokenized``)."""
    from tunelab.data.cache import cache_root as root

    return root()


def cache_entries() -> list[CacheEntry]:
    """Every cached tokenized dataset, newest first."""
    from tunelab.data.cache import list_entries

    return [CacheEntry(**entry.__dict__) for entry in list_entries()]


def clear_cache() -> CacheCleared:
    """Delete every cached tokenized dataset (runs reading one keep their mapping)."""
    from tunelab.data.cache import clear_entries

    count, size = clear_entries()
    return CacheCleared(removed=count, bytes=size)


def upload_dataset(source: Any, *, filename: str, limit_bytes: int | None = None) -> UploadedDataset:
    """Store an uploaded data file under ``$TUNELAB_HOME/datasets`` and validate it like `data validate`.

    The client's file name only picks the format (its suffix); the stored name
    is generated, so no path from the client is ever used as a path.  The bytes go
    to ``datasets/.incoming/`` first and are renamed into ``datasets/`` only after
    the last byte arrived and the records validated: a server killed mid-upload
    leaves no half file that could be listed or trained on.  A file over
    ``limit_bytes`` (default: the settings' upload limit) or with invalid records
    is deleted again.
    """
    import uuid

    from tunelab.errors import DataError, TooLargeError

    suffix = next((s for s in UPLOAD_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is None:
        raise DataError(f"upload a {', '.join(UPLOAD_SUFFIXES)} file (got {filename[:80]!r})")
    settings = get_settings()
    limit = settings.upload_limit_bytes if limit_bytes is None else limit_bytes
    incoming = _incoming_dir()
    dataset_id = uuid.uuid4().hex[:12]
    staged = incoming / f"{os.getpid()}-{dataset_id}{suffix}"  # the writer's pid: see _sweep_incoming
    dest = incoming.parent / f"{dataset_id}{suffix}"
    try:
        with staged.open("xb") as out:
            written = 0
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise TooLargeError(f"the file is larger than the upload limit of {limit} bytes")
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if written == 0:
            raise DataError(f"the uploaded file {shown_name(filename)} is empty")
        try:
            report = validate_dataset(str(staged))
        except DataError as exc:  # say it of the user's file: the staged name means nothing to them
            hint = exc.hint.replace(str(staged), shown_name(filename)) if exc.hint else None
            raise DataError(exc.message.replace(str(staged), shown_name(filename)), hint=hint) from None
        os.replace(staged, dest)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise
    splits = {name: {**split, "path": str(dest)} for name, split in report.splits.items()}
    return UploadedDataset(id=dataset_id, path=str(dest), format=report.format, size_bytes=written, splits=splits)


def shown_name(filename: str) -> str:
    """The client's file name as messages show it: its last part, printable, at most 100 characters."""
    name = filename.replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(c if c.isprintable() else "?" for c in name)[:100] or "the upload"


def _incoming_dir() -> Path:
    """``datasets/.incoming`` (created), with what dead writers left there removed first."""
    incoming = get_settings().datasets_dir / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    _sweep_incoming(incoming)
    return incoming


def _sweep_incoming(incoming: Path) -> None:
    """Delete staged uploads whose writing process is gone (a server killed mid-upload); live ones stay."""
    for path in incoming.iterdir():
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not process_exists(int(pid)):
            path.unlink(missing_ok=True)


def uploaded_datasets() -> list[str]:
    """Data files already under ``$TUNELAB_HOME/datasets`` (uploads land there), oldest name first."""
    folder = get_settings().datasets_dir
    if not folder.is_dir():
        return []
    if (folder / ".incoming").is_dir():
        _sweep_incoming(folder / ".incoming")
    return sorted(str(p) for p in folder.glob("*") if p.is_file() and p.suffix in UPLOAD_SUFFIXES)
