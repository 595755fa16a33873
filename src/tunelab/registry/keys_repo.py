"""Queries for API keys and encrypted secrets (callers own the session)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session

from tunelab.errors import NotFoundError
from tunelab.registry.repo import _iso
from tunelab.registry.tables import ApiKeyRow, SecretRow, utcnow


def add_api_key(session: Session, *, name: str, prefix: str, key_hash: str) -> ApiKeyRow:
    """Store a new key's hash (never the key)."""
    row = ApiKeyRow(name=name, prefix=prefix, key_hash=key_hash, created_at=utcnow())
    session.add(row)
    session.flush()
    return row


def find_active_key(session: Session, key_hash: str) -> ApiKeyRow | None:
    """The unrevoked key with this hash, if any."""
    stmt = select(ApiKeyRow).where(ApiKeyRow.key_hash == key_hash, ApiKeyRow.revoked_at.is_(None))
    return session.scalars(stmt).first()


def touch_key(session: Session, key_id: int, *, every_s: float = 60.0) -> None:
    """Record that the key was used now, unless that was recorded less than ``every_s`` ago.

    One conditional UPDATE: a busy key costs a write a minute, not one per request, and of many requests
    arriving at once only the first writes.
    """
    now = utcnow()
    stale = or_(ApiKeyRow.last_used_at.is_(None), ApiKeyRow.last_used_at < now - timedelta(seconds=every_s))
    session.execute(update(ApiKeyRow).where(ApiKeyRow.id == key_id, stale).values(last_used_at=now))


def list_api_keys(session: Session) -> list[ApiKeyRow]:
    return list(session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.id)))


def revoke_api_key(session: Session, name_or_id: str) -> list[ApiKeyRow]:
    """Revoke the key with this id, or every active key with this name."""
    rows = [r for r in list_api_keys(session) if r.revoked_at is None and name_or_id in (str(r.id), r.name)]
    if not rows:
        raise NotFoundError(f"no active API key named or numbered {name_or_id!r}; `tunelab auth list` shows them")
    for row in rows:
        row.revoked_at = utcnow()
    session.flush()
    return rows


def api_key_public(row: ApiKeyRow) -> dict[str, Any]:
    return {
        "id": row.id,
        "name": row.name,
        "prefix": row.prefix,
        "created_at": _iso(row.created_at),
        "last_used_at": _iso(row.last_used_at),
        "revoked_at": _iso(row.revoked_at),
    }


def put_secret(session: Session, *, name: str, ciphertext: str) -> None:
    row = session.get(SecretRow, name)
    if row is None:
        session.add(SecretRow(name=name, ciphertext=ciphertext, updated_at=utcnow()))
    else:
        row.ciphertext, row.updated_at = ciphertext, utcnow()
    session.flush()


def get_secret(session: Session, name: str) -> str | None:
    row = session.get(SecretRow, name)
    return row.ciphertext if row is not None else None


def secret_names(session: Session) -> list[str]:
    return list(session.scalars(select(SecretRow.name).order_by(SecretRow.name)))


def delete_secret(session: Session, name: str) -> None:
    row = session.get(SecretRow, name)
    if row is None:
        raise NotFoundError(f"no secret named {name!r}")
    session.delete(row)
