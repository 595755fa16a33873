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
    api_roots: tuple[Path, ...] = ()
    upload_limit_bytes: int = 100 * 2**20
    # One example's size in a dataset file: tokenizing a record costs ~200× its bytes in memory.
    max_record_bytes: int = 8 * 2**20
    # How long a chat over the API waits for the model (answers are generated one at a time) before a 503.
    chat_wait_s: float = 30.0

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    @property
    def datasets_dir(self) -> Path:
        """Where datasets uploaded over the API are stored."""
        return self.home / "datasets"

    @property
    def quickstart_dir(self) -> Path:
        """Where `tunelab quickstart` builds its model and data unless told otherwise."""
        return self.home / "quickstart"

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        """Folders paths given over the API may point into: configured roots, uploads, runs, and the quickstart's
        model and data (tunelab made them, so a newcomer's first job over the API can train on them)."""
        return (*self.api_roots, self.datasets_dir, self.runs_dir, self.quickstart_dir)


def get_settings() -> Settings:
    """Build settings from ``TUNELAB_HOME`` (default ``~/.tunelab``) and ``TUNELAB_DB_URL``.

    The DB defaults to SQLite at ``$TUNELAB_HOME/tunelab.db``; any SQLAlchemy URL
    (e.g. ``postgresql+psycopg://…``) may be given instead.
    """
    home = Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".tunelab").expanduser()
    db_url = os.environ.get("TUNELAB_DB_URL") or f"sqlite:///{home / 'tunelab.db'}"
    # TUNELAB_API_ROOTS: os.pathsep-separated folders (models, data) the API may use.
    roots = tuple(Path(p).expanduser() for p in os.environ.get("TUNELAB_API_ROOTS", "").split(os.pathsep) if p)
    upload_mb = _positive_float("TUNELAB_UPLOAD_LIMIT_MB", 100.0)
    record_mb = _positive_float("TUNELAB_MAX_RECORD_MB", 8.0)
    chat_wait_s = _positive_float("TUNELAB_CHAT_WAIT_S", 30.0)
    return Settings(
        home=home,
        db_url=db_url,
        api_roots=roots,
        upload_limit_bytes=int(upload_mb * 2**20),
        max_record_bytes=int(record_mb * 2**20),
        chat_wait_s=chat_wait_s,
    )


def _positive_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        from tunelab.errors import ConfigError

        raise ConfigError(f"{name} must be a positive number (got {text!r})")
    return value


def quiet_libraries() -> None:
    """Keep the terminal and the job logs for tunelab's own output: no weight-loading bars or deprecation chatter.

    Called first by every process that trains or exports: the CLI, and a job's child process (started from
    a forkserver, which inherits the environment but not the warning filters).  The environment variables
    must be set before transformers and huggingface_hub are imported, which read them once.
    """
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # Deprecations inside transformers/peft/torch are for their callers (tunelab), not for its users.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(transformers|peft|torch)(\.|$)")
