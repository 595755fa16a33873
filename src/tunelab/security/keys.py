"""API keys: random, shown once, stored only as a SHA-256 digest.

A key is 32 random bytes, so a fast hash is as safe as a slow one (there is
nothing to brute-force); comparing digests also keeps the lookup an index hit.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timezone
from typing import Any

from tunelab.errors import ConfigError
from tunelab.registry import keys_repo
from tunelab.registry.db import open_registry, session_scope

KEY_PREFIX = "tl_"
TOUCH_EVERY_S = 60.0
"""``last_used_at`` is exact to a minute: a request per second costs one write a minute."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def create_key(name: str) -> tuple[str, dict[str, Any]]:
    """Make a key; returns ``(key, public record)`` — the key itself is not kept anywhere."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ConfigError("--name must be 1 to 100 characters")
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    with session_scope(open_registry()) as s:
        row = keys_repo.add_api_key(s, name=name, prefix=key[:8], key_hash=hash_key(key))
        return key, keys_repo.api_key_public(row)


def verify_key(key: str) -> dict[str, Any] | None:
    """The active key's public record, or None when the key is unknown or revoked."""
    if not key.startswith(KEY_PREFIX) or len(key) > 200:
        return None
    with session_scope(open_registry()) as s:
        row = keys_repo.find_active_key(s, hash_key(key))
        if row is None:
            return None
        if _stale(row.last_used_at):  # checked here first, so most requests don't even send the UPDATE
            keys_repo.touch_key(s, row.id, every_s=TOUCH_EVERY_S)
        return keys_repo.api_key_public(row)


def _stale(last_used: datetime | None) -> bool:
    if last_used is None:
        return True
    if last_used.tzinfo is None:  # SQLite hands datetimes back without their zone (they are stored in UTC)
        last_used = last_used.replace(tzinfo=timezone.utc)
    return (datetime.now(timezone.utc) - last_used).total_seconds() >= TOUCH_EVERY_S


def list_keys() -> list[dict[str, Any]]:
    with session_scope(open_registry()) as s:
        return [keys_repo.api_key_public(r) for r in keys_repo.list_api_keys(s)]


def revoke_key(name_or_id: str) -> list[dict[str, Any]]:
    """Revoke by id or name; returns what was revoked."""
    with session_scope(open_registry()) as s:
        return [keys_repo.api_key_public(r) for r in keys_repo.revoke_api_key(s, name_or_id)]
