"""Read a DCP checkpoint's ``.metadata`` without letting the file run code.

``torch.distributed.checkpoint`` keeps its index (which tensor lives in which
file, at which offset) as a pickle and reads it with a plain ``pickle.load``,
so a ``.metadata`` planted in a run folder would run code on ``--resume``.
:class:`SafeReader` is DCP's own file-system reader with one change: the index
is unpickled with an allow-list of the classes DCP puts there (its metadata
dataclasses, tensor sizes, dtypes, layouts and paths); anything else is refused.
The tensor data itself DCP already reads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

_METADATA = ".metadata"
_DCP_METADATA_MODULE = "torch.distributed.checkpoint.metadata"
_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch": frozenset({"Size"}),
    "pathlib": frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}),
    "collections": frozenset({"OrderedDict"}),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = super().find_class(module, name) if _allowed(module, name) else None
        if found is None:
            raise pickle.UnpicklingError(f"refused {module}.{name} in a checkpoint's {_METADATA} (not DCP metadata)")
        return found


def _allowed(module: str, name: str) -> bool:
    if module == _DCP_METADATA_MODULE:  # DCP's own plain dataclasses and enums
        return not name.startswith("__")
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return True
    return name in _ALLOWED.get(module, frozenset())


def load_metadata(path: Path) -> Metadata:
    """The DCP index at ``path`` (a ``.metadata`` file), unpickled through the allow-list."""
    with path.open("rb") as fh:
        metadata = _IndexUnpickler(fh).load()
    if not isinstance(metadata, Metadata):
        raise pickle.UnpicklingError(f"{path} holds a {type(metadata).__name__}, not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader, reading the index through :func:`load_metadata`."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self._folder = path

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        metadata = load_metadata(self._folder / (_METADATA if rank is None else f"__{rank}{_METADATA}"))
        storage = metadata.storage_meta if metadata.storage_meta is not None else StorageMeta()
        storage.load_id = self.load_id  # as DCP's own reader does: the id of this load
        metadata.storage_meta = storage
        return metadata
