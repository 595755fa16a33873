"""API keys for `tunelab serve` and secrets encrypted at rest: create, list, verify, revoke, store."""

from __future__ import annotations

from tunelab.services.views import KeyView


def create_key(name: str) -> tuple[str, KeyView]:
    """Make a key; returns ``(key, its record)``: the key is shown once and only its hash is kept."""
    from tunelab.security.keys import create_key as make

    key, row = make(name)
    return key, KeyView(**row)


def list_keys() -> list[KeyView]:
    """Every API key (names and prefixes; the keys themselves are not stored)."""
    from tunelab.security.keys import list_keys as rows

    return [KeyView(**row) for row in rows()]


def revoke_key(name_or_id: str) -> list[KeyView]:
    """Revoke the key with this id, or every key with this name; returns what was revoked."""
    from tunelab.security.keys import revoke_key as revoke

    return [KeyView(**row) for row in revoke(name_or_id)]


def verify_key(key: str) -> KeyView | None:
    """The active key's record, or None when the key is unknown or revoked (the API's 401)."""
    from tunelab.security.keys import verify_key as verify

    row = verify(key)
    return KeyView(**row) if row is not None else None


def set_secret(name: str, value: str) -> None:
    """Encrypt and store ``value`` under ``name`` (replacing an older one)."""
    from tunelab.security.secrets import set_secret as store

    store(name, value)


def list_secrets() -> list[str]:
    """The names of stored secrets (never their values)."""
    from tunelab.security.secrets import list_secrets as names

    return names()
