"""Datasets: validate and preview them as training reads them, upload them, and the tokenization cache."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tunelab.services.views import CacheCleared, CacheEntry, DatasetReport, UploadedDataset
from tunelab.settings import get_settings
from tunelab.vocab import UPLOAD_SUFFIXES


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
    """Run the checks training runs on every record (DataError names the first bad one) and summarise.

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


def preview_dataset(path: str, *, model: str, n: int = 3, **options: Any) -> Any:
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
    is generated, so no path from the client is ever used as a path.  A file
    over ``limit_bytes`` (default: the settings' upload limit) or with invalid
    records is deleted again.
    """
    import uuid

    from tunelab.errors import DataError, TooLargeError

    suffix = next((s for s in UPLOAD_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is None:
        raise DataError(f"upload a {', '.join(UPLOAD_SUFFIXES)} file (got {filename[:80]!r})")
    settings = get_settings()
    limit = settings.upload_limit_bytes if limit_bytes is None else limit_bytes
    folder = settings.datasets_dir
    folder.mkdir(parents=True, exist_ok=True)
    dataset_id = uuid.uuid4().hex[:12]
    dest = folder / f"{dataset_id}{suffix}"
    try:
        with dest.open("xb") as out:
            written = 0
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limit:
                    raise TooLargeError(f"the file is larger than the upload limit of {limit} bytes")
                out.write(chunk)
        if written == 0:
            raise DataError("the uploaded file is empty")
        report = validate_dataset(str(dest))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return UploadedDataset(
        id=dataset_id, path=str(dest), format=report.format, size_bytes=written, splits=report.splits
    )


def uploaded_datasets() -> list[str]:
    """Data files already under ``$TUNELAB_HOME/datasets`` (uploads land there), oldest name first."""
    folder = get_settings().datasets_dir
    return sorted(str(p) for p in folder.glob("*") if p.suffix in UPLOAD_SUFFIXES) if folder.is_dir() else []
