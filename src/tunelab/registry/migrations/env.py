"""Alembic environment for the tunelab registry.

tunelab runs migrations itself (``tunelab.registry.db.migrate``) and hands over
an open connection in ``config.attributes["connection"]``; that connection's
transaction is owned by the caller, so nothing is committed here.  When invoked
from the ``alembic`` command line instead (to write a new revision), the URL is
taken from the config's ``sqlalchemy.url`` or from tunelab's settings.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from tunelab.registry.tables import Base

config = context.config
target_metadata = Base.metadata


def _configure(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite can't ALTER most things in place; batch mode recreates tables.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return url
    from tunelab.settings import get_settings

    return get_settings().db_url


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return

    from tunelab.registry.db import make_engine

    engine = make_engine(_url())
    try:
        with engine.begin() as conn:
            _configure(conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
