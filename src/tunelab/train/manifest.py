"""A checkpoint's manifest: every file's size and sha256, written last, inside the atomic rename.

The rename makes a checkpoint appear whole or not at all, but a disk can still
damage a file afterwards, or a person can truncate or replace one.  Resuming
from such a folder ends in a traceback deep inside a tensor loader (or worse, a
silently wrong run), so before a checkpoint is loaded its files are compared
with the manifest and a damaged one is skipped in favour of an older one.

Checkpoints written before manifests existed are checked as far as the format
allows: the JSON files and the safetensors headers must parse, and no file may
be empty; anything deeper is left to the backend's loader.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

MANIFEST_FILE = "manifest.json"
_CHUNK = 8 << 20
_MAX_HEADER = 100 << 20  # safetensors refuses headers above 100 MB too


def write_manifest(folder: Path) -> int:
    """Hash and fsync every file under ``folder``, then write (and fsync) the manifest; returns the total bytes."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE:
            size, digest = _hash_and_sync(path)
            files[path.relative_to(folder).as_posix()] = {"size": size, "sha256": digest}
    manifest = folder / MANIFEST_FILE
    manifest.write_text(json.dumps({"version": 1, "files": files}, indent=1), encoding="utf-8")
    _hash_and_sync(manifest)
    return sum(int(entry["size"]) for entry in files.values())


def verify(folder: Path) -> str | None:
    """Why the checkpoint in ``folder`` can't be trusted, or None when it checks out."""
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return _verify_unlisted(folder)
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        entries = [(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return f"its {MANIFEST_FILE} is unreadable ({exc})"
    for name, size, digest in entries:
        path = folder / name
        if ".." in Path(name).parts or not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes where {size} were written (truncated or replaced)"
        if _hash_and_sync(path, sync=False)[1] != digest:
            return f"{name} does not match the sha256 written with it (damaged or replaced)"
    return None


def folder_bytes(folder: Path) -> int:
    """The bytes of the files under ``folder`` (0 when it is gone)."""
    total = 0
    for path in folder.rglob("*") if folder.is_dir() else ():
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:  # removed while we looked
            continue
    return total


def _verify_unlisted(folder: Path) -> str | None:
    """A checkpoint from before manifests: what can be checked without its loaders."""
    for path in sorted(folder.iterdir()):
        if not path.is_file():
            continue
        if path.stat().st_size == 0:
            return f"{path.name} is empty"
        if path.suffix == ".json":
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                return f"{path.name} is not valid JSON ({exc})"
        elif path.suffix == ".safetensors":
            problem = _safetensors_problem(path)
            if problem is not None:
                return f"{path.name} {problem}"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header, then the data the header describes."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return "is too short to be a safetensors file"
        (length,) = struct.unpack("<Q", head)
        if length > min(size - 8, _MAX_HEADER):
            return "has a header longer than the file (truncated)"
        try:
            header = json.loads(fh.read(length))
            ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            return f"has an unreadable header ({exc})"
    if size != 8 + length + max(ends, default=0):
        return f"has {size} bytes where its header describes {8 + length + max(ends, default=0)} (truncated)"
    return None


def _hash_and_sync(path: Path, *, sync: bool = True) -> tuple[int, str]:
    """Size and sha256 of ``path``, read once; with ``sync`` also flushed to the disk (the rename comes after)."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return size, digest.hexdigest()
