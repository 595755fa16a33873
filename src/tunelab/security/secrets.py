"""Secrets tunelab keeps (hub token, W&B key), encrypted at rest with Fernet.

The key lives in ``$TUNELAB_HOME/secret.key`` with mode 0600, created on first
use; the registry (which may be a shared PostgreSQL) only ever sees ciphertext.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

from tunelab.errors import ConfigError, StateError
from tunelab.registry import keys_repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.settings import get_settings

if TYPE_CHECKING:
    from cryptography.fernet import Fernet

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def key_file() -> Path:
    return get_settings().home / "secret.key"


def _fernet() -> Fernet:
    from cryptography.fernet import Fernet

    path = key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        # O_EXCL + mode 0600 at creation: the key is never readable by others, not even briefly.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process made it first
        else:
            with os.fdopen(fd, "wb") as fh:
                fh.write(Fernet.generate_key())
    if path.stat().st_mode & 0o077:
        raise StateError(f"{path} is readable by other users", hint=f"run: chmod 600 {path}")
    return Fernet(path.read_bytes().strip())


def set_secret(name: str, value: str) -> None:
    """Encrypt and store ``value`` under ``name`` (replacing an older one)."""
    if not _NAME.match(name):
        raise ConfigError("a secret name is 1-64 letters, digits, '_', '.' or '-'")
    token = _fernet().encrypt(value.encode("utf-8")).decode("ascii")
    with session_scope(open_registry()) as s:
        keys_repo.put_secret(s, name=name, ciphertext=token)


def get_secret(name: str) -> str | None:
    """The decrypted secret, or None when not set."""
    from cryptography.fernet import InvalidToken

    with session_scope(open_registry()) as s:
        token = keys_repo.get_secret(s, name)
    if token is None:
        return None
    try:
        return _fernet().decrypt(token.encode("ascii")).decode("utf-8")
    except InvalidToken:
        raise StateError(
            f"secret {name!r} was encrypted with another key than {key_file()}",
            hint=f"set it again: tunelab auth set-secret {name}",
        ) from None


def list_secrets() -> list[str]:
    with session_scope(open_registry()) as s:
        return keys_repo.secret_names(s)


def delete_secret(name: str) -> None:
    with session_scope(open_registry()) as s:
        keys_repo.delete_secret(s, name)
