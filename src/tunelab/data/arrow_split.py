"""One tokenized split as an Arrow IPC file: written chunk by chunk, read back as memory-mapped rows.

The file holds two ``large_list<int32>`` columns, ``input_ids`` and ``labels``
(one row per example), plus an ``int8`` ``roles`` column for preference data.
Writing appends record batches as tokenizer workers hand chunks back, so a
split is never held whole in memory; reading maps the file and hands out rows
as zero-copy views, so a split larger than RAM is paged in as batches ask.
:mod:`tunelab.data.cache` decides where these files live and when they are
reused; this module only knows the file layout.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from tunelab.data.tokenize import TokenizedSplit
from tunelab.vocab import IGNORE

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
            parts.append((_numpy(array.offsets, np.int64), _numpy(array.values, np.int32)))
        if roles is not None:
            roles.append(_numpy(batch.column("roles"), np.int8))
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
        offsets = _arrow(pa, np.concatenate([[0], np.cumsum(chunk.lengths)]), pa.int64(), np.int64)
        columns = [
            pa.LargeListArray.from_arrays(offsets, _arrow(pa, chunk.ids, pa.int32(), np.int32)),
            pa.LargeListArray.from_arrays(offsets, _arrow(pa, chunk.labels, pa.int32(), np.int32)),
        ]
        if self._schema.get_field_index("roles") >= 0:
            roles = chunk.roles if chunk.roles is not None else np.zeros(len(chunk.lengths), dtype=np.int8)
            columns.append(_arrow(pa, roles, pa.int8(), np.int8))
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


# pyarrow's ``pa.array`` and ``Array.to_numpy`` import pandas (about 0.4 s of a small run's start) to check
# whether they were handed a pandas object; these two move plain numpy vectors through the buffers instead.


def _arrow(pa: Any, values: np.ndarray, kind: Any, dtype: Any) -> Any:
    """A 1-D numpy vector as an Arrow array of ``kind`` (no nulls), sharing its memory."""
    values = np.ascontiguousarray(values, dtype=dtype)
    return pa.Array.from_buffers(kind, len(values), [None, pa.py_buffer(values)])


def _numpy(array: Any, dtype: Any) -> np.ndarray:
    """A read-only numpy view of a null-free, fixed-width Arrow array (zero-copy)."""
    if array.null_count:
        raise ValueError("a tokenized split holds no nulls")
    data = array.buffers()[1]
    if data is None or not len(array):
        return np.zeros(0, dtype=dtype)
    return np.frombuffer(data, dtype=dtype)[array.offset : array.offset + len(array)]


def _supervised(chunk: TokenizedChunk) -> int:
    """Labels that carry loss, not counting each row's first (it predicts nothing)."""
    firsts = np.concatenate([[0], np.cumsum(chunk.lengths)[:-1]])
    trained = chunk.labels != IGNORE
    return int(trained.sum() - trained[firsts].sum())
