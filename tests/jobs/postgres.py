"""A throwaway PostgreSQL cluster on loopback, for running the queue tests against a real server.

initdb/pg_ctl come from Debian's postgresql package (scripts/test.sh installs
it); PostgreSQL refuses to run as root, so as root the cluster is owned by and
run as the ``postgres`` user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    """Why no server could be started here (the tests skip with this reason)."""


def _bin(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        raise PostgresUnavailable(f"{name} not found (install Debian's postgresql package)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_owner(cmd: list[str]) -> list[str]:
    if os.geteuid() != 0:
        return cmd
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresUnavailable("running as root without runuser: PostgreSQL cannot run as root")
    return [runuser, "-u", "postgres", "--", *cmd]


@contextmanager
def postgres_server() -> Iterator[str]:
    """Start a cluster in a temp dir; yield a SQLAlchemy URL; stop and delete it afterwards."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise PostgresUnavailable("the psycopg driver is not installed (pip install 'psycopg[binary]')") from None
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    root = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    data, port = root / "data", _free_port()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
    try:
        _run(_as_owner([initdb, "-D", str(data), "-U", "tunelab", "-A", "trust", "--no-sync"]))
        opts = f"-h 127.0.0.1 -p {port} -k {root} -c fsync=off -c max_connections=50"
        _run(_as_owner([pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "-t", "60", "start"]))
    except PostgresUnavailable:
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield f"postgresql+psycopg://tunelab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(_as_owner([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _run(cmd: list[str]) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PostgresUnavailable(f"{cmd[0]} failed: {exc}") from None
    if done.returncode != 0:
        raise PostgresUnavailable(f"{' '.join(cmd[:4])}… failed: {(done.stderr or done.stdout).strip()[-400:]}")
