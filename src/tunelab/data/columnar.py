"""Columnar files (Parquet, Arrow IPC / Feather, HDF5) read as a stream of row dicts.

Each reader walks its file a block of rows at a time, so a table larger than
memory never has to be loaded whole; rows are numbered from 1 (these formats
have no lines) so error messages still point at one record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import DataError

BLOCK_ROWS = 1024


def iter_parquet(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of a Parquet file, one record batch at a time."""
    import pyarrow.parquet as pq

    try:
        handle = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises many types for a corrupt file
        raise DataError(f"not a readable Parquet file ({exc})", path=str(path)) from None
    for batch in handle.iter_batches(batch_size=BLOCK_ROWS):
        yield from batch.to_pylist()


def iter_arrow(path: Path) -> Iterator[dict[str, Any]]:
    """Rows of an Arrow IPC file (``.arrow``/``.feather`` v2) or stream (what `datasets` caches), memory-mapped."""
    import pyarrow as pa

    source = pa.memory_map(str(path), "r")
    try:
        # The two IPC layouts share a suffix, so try the file layout (random access) and then the stream one.
        try:
            reader: Any = pa.ipc.open_file(source)
            batches: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            source.seek(0)
            try:
                batches = pa.ipc.open_stream(source)
            except pa.ArrowInvalid as exc:
                raise DataError(f"not an Arrow IPC file or stream ({exc})", path=str(path)) from None
        for batch in batches:
            yield from batch.to_pylist()
    finally:
        source.close()


def iter_hdf5(path: Path, split: str = "train") -> Iterator[dict[str, Any]]:
    """Rows of an HDF5 table: a compound dataset, or a group of equally long 1-D column datasets.

    When the file holds several tables, the one named like the split (``train``,
    ``validation``…) is read.
    """
    try:
        import h5py
    except ImportError:
        raise DataError(
            "reading HDF5 needs the h5py package", path=str(path), hint="pip install h5py, or convert to Parquet"
        ) from None
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise DataError(f"not a readable HDF5 file ({exc})", path=str(path)) from None
    with handle:
        table = _pick_table(handle, split, path)
        if isinstance(table, h5py.Dataset):
            yield from _compound_rows(table)
        else:
            yield from _column_rows(table, path)


def _pick_table(handle: Any, split: str, path: Path) -> Any:
    import h5py

    def is_table(node: Any) -> bool:
        if isinstance(node, h5py.Dataset):
            return node.dtype.names is not None and node.ndim == 1
        return isinstance(node, h5py.Group) and any(isinstance(v, h5py.Dataset) for v in node.values())

    candidates = {name: node for name, node in handle.items() if is_table(node)}
    for name in (split, "valid", "validation", "val", "dev", "eval", "test") if split != "train" else (split,):
        if name in candidates:
            return candidates[name]
    if len(candidates) == 1:
        return next(iter(candidates.values()))
    if not candidates and any(isinstance(v, h5py.Dataset) for v in handle.values()):
        return handle  # columns stored at the file's root
    raise DataError(
        f"can't tell which table to read: the file holds {sorted(candidates) or 'no table'}",
        path=str(path),
        hint=f"name the table {split!r}, or keep one table (a compound dataset or a group of 1-D columns) per file",
    )


def _compound_rows(table: Any) -> Iterator[dict[str, Any]]:
    names = table.dtype.names
    for start in range(0, table.shape[0], BLOCK_ROWS):
        for row in table[start : start + BLOCK_ROWS]:
            yield {name: _plain(row[name]) for name in names}


def _column_rows(group: Any, path: Path) -> Iterator[dict[str, Any]]:
    import h5py

    columns = {name: node for name, node in group.items() if isinstance(node, h5py.Dataset)}
    lengths = {name: node.shape[0] if node.ndim else 1 for name, node in columns.items()}
    if len(set(lengths.values())) != 1 or any(node.ndim != 1 for node in columns.values()):
        raise DataError(
            f"HDF5 columns must be 1-D and equally long, got lengths {lengths}",
            path=str(path),
            hint="store one 1-D dataset per field, all with one entry per example",
        )
    total = next(iter(lengths.values()))
    for start in range(0, total, BLOCK_ROWS):
        block = {name: node[start : start + BLOCK_ROWS] for name, node in columns.items()}
        for offset in range(min(BLOCK_ROWS, total - start)):
            yield {name: _plain(values[offset]) for name, values in block.items()}


def _plain(value: Any) -> Any:
    """HDF5 hands strings back as bytes and numbers as numpy scalars; records hold plain Python values."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())
    return value
