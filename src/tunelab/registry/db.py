"""Engines, migrations and sessions for the run registry.

Nothing here runs at import: an engine is built, and the schema brought up to
date, the first time :func:`open_registry` is called for a URL in a process.
SQLite is the default store and several processes (a training run, the CLI, the
API server) may use one file at the same time, hence WAL and a busy timeout.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import InvalidRequestError, OperationalError
from sqlalchemy.orm import Session

from tunelab.errors import StateError, StorageError
from tunelab.settings import get_settings

if TYPE_CHECKING:
    from alembic.config import Config

# alembic (with mako and its dialect modules) is imported only when a registry is opened, so
# commands that never open one (``--help``, ``init``, ``estimate``) don't pay for it at startup.

_MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_BUSY_TIMEOUT_MS = 30_000

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()
_process_hooks_registered = False
_heads: frozenset[str] | None = None


def _sqlite_file(url: str) -> Path | None:
    """The on-disk file behind a SQLite URL, or None for in-memory/URI databases."""
    database = make_url(url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _enable_wal(cursor: Any) -> None:
    """Switch the file to WAL so readers (CLI, API) proceed while a training run writes.

    The switch needs an exclusive lock and SQLite fails it at once, without the
    busy handler, when another connection is reading a fresh DB; so retry for as
    long as busy_timeout would have waited.  WAL persists in the file, so this
    only ever contends on the very first connections.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT_MS / 1000
    delay = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _on_sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        # busy_timeout first: switching to WAL itself needs a lock another
        # process may be holding.
        cursor.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
        _enable_wal(cursor)
        cursor.execute("PRAGMA foreign_keys = ON")
    finally:
        cursor.close()


def make_engine(url: str) -> Engine:
    """Build an engine for ``url``; SQLite gets the pragmas that make sharing safe."""
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        path = _sqlite_file(url)
        if path is not None:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StorageError(
                    f"could not create {path.parent} for the registry database: {exc.strerror or exc}",
                    hint="set TUNELAB_HOME to a folder you can write (default ~/.tunelab), or TUNELAB_DB_URL",
                ) from None
        engine = create_engine(url)
        event.listen(engine, "connect", _on_sqlite_connect)
        return engine
    # Server databases drop idle connections; check before handing one out.
    return create_engine(url, pool_pre_ping=True)


def _alembic_config(connection: Connection | None = None) -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS_DIR))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def _head_revisions() -> frozenset[str]:
    # Parsing the version scripts is the slow part of a no-op check; they can't
    # change under a running process, so read them once.
    global _heads
    if _heads is None:
        from alembic.script import ScriptDirectory

        _heads = frozenset(ScriptDirectory.from_config(_alembic_config()).get_heads())
    return _heads


def _current_revisions(connection: Connection) -> frozenset[str]:
    from alembic.runtime.migration import MigrationContext

    return frozenset(MigrationContext.configure(connection).get_current_heads())


def _check_known(connection: Connection, current: frozenset[str]) -> None:
    """Refuse to touch a DB written by a newer tunelab instead of failing obscurely."""
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    script = ScriptDirectory.from_config(_alembic_config())
    for rev in current:
        try:
            known = script.get_revision(rev) is not None
        except CommandError:
            known = False
        if not known:
            url = connection.engine.url.render_as_string(hide_password=True)
            raise StateError(
                f"the registry at {url} is at schema revision {rev!r}, which this version of tunelab does not know",
                hint="upgrade tunelab, or point TUNELAB_DB_URL/TUNELAB_HOME at another registry",
            )


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision; a cheap no-op when already there."""
    heads = _head_revisions()
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        if _current_revisions(conn) == heads:
            conn.rollback()
            return
        if sqlite:
            conn.rollback()
            # A batch migration recreates a table (copy, drop the old one, rename); with foreign keys
            # on, dropping the old table cascades to every row pointing at it: a run's metrics,
            # artifacts, jobs and events would vanish in an upgrade.  SQLite ignores this pragma inside
            # a transaction, so it is switched off before BEGIN, checked before commit, restored after.
            conn.exec_driver_sql("PRAGMA foreign_keys = OFF")
            # Take the write lock before re-checking, so two processes opening a
            # fresh DB at once queue up instead of both creating the tables.
            # (pysqlite does not wrap DDL in a transaction on its own.)
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        try:
            current = _current_revisions(conn)
            if current == heads:
                conn.rollback()
                return
            _check_known(conn, current)
            from alembic import command

            # The migration joins this connection's transaction; we commit it.
            command.upgrade(_alembic_config(conn), "head")
            if sqlite and conn.exec_driver_sql("PRAGMA foreign_key_check").first() is not None:
                conn.rollback()
                raise StateError("upgrading the registry database would break its references; nothing was changed")
            conn.commit()
        finally:
            if sqlite:
                conn.exec_driver_sql("PRAGMA foreign_keys = ON")
                conn.commit()


def _dispose_after_fork() -> None:
    # A forked child must not reuse the parent's pooled connections (SQLite
    # file handles and sockets are not fork-safe); close=False leaves the
    # parent's connections alone.
    for engine in list(_engines.values()):
        engine.dispose(close=False)


def open_registry(url: str | None = None) -> Engine:
    """The engine for ``url`` (default: settings' DB), migrated on first use in this process."""
    global _process_hooks_registered
    if url is None:
        url = get_settings().db_url
    engine = _engines.get(url)
    if engine is not None:
        return engine
    with _engines_lock:
        engine = _engines.get(url)
        if engine is None:
            engine = make_engine(url)
            try:
                migrate(engine)
            except OperationalError as exc:
                engine.dispose()
                raise _unreachable(engine, exc) from None
            except BaseException:
                engine.dispose()
                raise
            _engines[url] = engine
            if not _process_hooks_registered:
                if hasattr(os, "register_at_fork"):
                    os.register_at_fork(after_in_child=_dispose_after_fork)
                # The CLI ends with os._exit after the atexit handlers (no interpreter teardown), so the
                # connections are closed here: SQLite folds its write-ahead log back into the database
                # and removes it when the last one closes, as it did when teardown closed them.
                atexit.register(close_registries)
                _process_hooks_registered = True
    return engine


def _unreachable(engine: Engine, exc: OperationalError) -> StorageError:
    """The database can't be opened (server down, wrong host or credentials, unwritable file): say which, and
    where it comes from, without the driver's traceback or the URL's password."""
    reason = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc).splitlines()[0]
    where = engine.url.render_as_string(hide_password=True)
    return StorageError(
        f"could not open the registry database {where}: {reason}",
        hint="check TUNELAB_DB_URL (unset it to use SQLite under TUNELAB_HOME) and that the database server is running",
    )


def close_registries() -> None:
    """Dispose every cached engine (tests, and long-lived servers switching DBs)."""
    with _engines_lock:
        engines = list(_engines.values())
        _engines.clear()
    for engine in engines:
        engine.dispose()


@contextmanager
def session_scope(engine: Engine) -> Iterator[Session]:
    """A session that commits when the block succeeds and rolls back when it raises.

    ``expire_on_commit=False`` so rows returned from the block stay readable
    after it closes (the CLI prints them afterwards).
    """
    session = Session(engine, expire_on_commit=False)
    try:
        yield session
        session.commit()
    except BaseException:
        # A signal handler's KeyboardInterrupt (Ctrl-C, SIGTERM) raised in the commit's after-commit hooks finds
        # the commit landed: nothing to roll back (SQLAlchemy refuses), and the interrupt is what must go on up.
        with contextlib.suppress(InvalidRequestError):
            session.rollback()
        raise
    finally:
        session.close()
