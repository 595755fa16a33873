"""Datasets remember their tokenization cache key and statistics; runs their memory estimate.

Also widens ``runs.peak_memory_bytes`` to 64 bits.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("datasets") as batch:
        batch.add_column(sa.Column("cache_key", sa.String(), nullable=True))
        batch.add_column(sa.Column("stats", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("estimated_memory_bytes", sa.BigInteger(), nullable=True))
        # Peak bytes overflow a 32-bit INTEGER on PostgreSQL past 2 GiB.
        batch.alter_column("peak_memory_bytes", type_=sa.BigInteger(), existing_type=sa.Integer())


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("peak_memory_bytes", type_=sa.Integer(), existing_type=sa.BigInteger())
        batch.drop_column("estimated_memory_bytes")
    with op.batch_alter_table("datasets") as batch:
        batch.drop_column("stats")
        batch.drop_column("cache_key")
