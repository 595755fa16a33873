"""Where tunelab keeps its state.  Read from the environment when asked, never at import."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    """Resolved locations and limits for this process."""

    home: Path
    db_url: str

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"


def get_settings() -> Settings:
    """Build settings from ``TUNELAB_HOME`` (default ``~/.tunelab``) and ``TUNELAB_DB_URL``.

    The DB defaults to SQLite at ``$TUNELAB_HOME/tunelab.db``; any SQLAlchemy URL
    (e.g. ``postgresql+psycopg://…``) may be given instead.
    """
    home = Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".tunelab").expanduser()
    db_url = os.environ.get("TUNELAB_DB_URL") or f"sqlite:///{home / 'tunelab.db'}"
    return Settings(home=home, db_url=db_url)
