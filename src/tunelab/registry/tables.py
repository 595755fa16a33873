"""ORM rows of the run registry.

The schema is owned by the Alembic migrations in ``migrations/versions``; these
classes must stay in step with them (a test compares the two).  Constraint
names are spelled out so that SQLite batch migrations can find them later.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Current time as an aware UTC datetime (the only kind the registry stores)."""
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator[datetime]):
    """A datetime that always comes back timezone-aware in UTC.

    SQLite has no timezone storage, so values are normalised to UTC on the way in
    and tagged as UTC on the way out; naive inputs are taken to already be UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        # SQLite keeps datetimes as text and compares them as strings, so every
        # stored value must be the same naive-UTC shape for ORDER BY to be correct.
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def _json() -> JSON:
    # none_as_null: Python None must become SQL NULL, not the JSON text 'null',
    # so that "IS NULL" means "not set".
    return JSON(none_as_null=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class ModelRow(Base):
    """A base model (local path or hub id) that runs were trained from."""

    __tablename__ = "models"
    __table_args__ = (UniqueConstraint("path", name="uq_models_path"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String, nullable=False)
    architecture: Mapped[str | None] = mapped_column(String, nullable=True)
    num_params: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class DatasetRow(Base):
    """A dataset version: the same path with different contents is a different row."""

    __tablename__ = "datasets"
    __table_args__ = (
        UniqueConstraint("path", "content_hash", name="uq_datasets_path_content_hash"),
        Index("ix_datasets_content_hash", "content_hash"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    path: Mapped[str] = mapped_column(String, nullable=False)
    content_hash: Mapped[str] = mapped_column(String, nullable=False)
    format: Mapped[str | None] = mapped_column(String, nullable=True)
    num_train: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_valid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cache_key: Mapped[str | None] = mapped_column(String, nullable=True)
    stats: Mapped[dict[str, Any] | None] = mapped_column(_json(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class RunRow(Base):
    """One fine-tuning run; ``status`` is one of :data:`tunelab.vocab.RUN_STATUSES`."""

    __tablename__ = "runs"
    __table_args__ = (Index("ix_runs_status", "status"), Index("ix_runs_sweep_id", "sweep_id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String, nullable=True)
    status: Mapped[str] = mapped_column(String, nullable=False)
    backend: Mapped[str | None] = mapped_column(String, nullable=True)
    device: Mapped[str | None] = mapped_column(String, nullable=True)
    backend_reason: Mapped[str | None] = mapped_column(String, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    model_id: Mapped[int | None] = mapped_column(
        Integer,
        ForeignKey("models.id", name="fk_runs_model_id_models", ondelete="SET NULL"),
        nullable=True,
    )
    dataset_id: Mapped[int | None] = mapped_column(
        Integer,
        ForeignKey("datasets.id", name="fk_runs_dataset_id_datasets", ondelete="SET NULL"),
        nullable=True,
    )
    output_dir: Mapped[str] = mapped_column(String, nullable=False)
    chat_template: Mapped[str | None] = mapped_column(String, nullable=True)
    step: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))
    total_steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    final_metrics: Mapped[dict[str, Any] | None] = mapped_column(_json(), nullable=True)
    peak_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    estimated_memory_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # Out-of-memory back-offs, oldest first: {"step", "micro_batch_size", "grad_accum", "reason"} each.
    memory_backoffs: Mapped[list[dict[str, Any]] | None] = mapped_column(_json(), nullable=True)
    # The process training the run (set when it starts): a `running` run whose process is gone is marked failed.
    owner_pid: Mapped[int | None] = mapped_column(Integer, nullable=True)
    owner_host: Mapped[str | None] = mapped_column(String, nullable=True)
    # A sweep's trial: its runs are grouped (migration 0008).
    sweep_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("sweeps.id", name="fk_runs_sweep_id_sweeps", ondelete="SET NULL"), nullable=True
    )


class MetricRow(Base):
    """One scalar logged at one step; ``value`` is NULL when it was NaN or infinite."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_id_step", "run_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(32),
        ForeignKey("runs.id", name="fk_metrics_run_id_runs", ondelete="CASCADE"),
        nullable=False,
    )
    step: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String, nullable=False)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class ArtifactRow(Base):
    """A file or directory a run produced (adapter, checkpoint, logs, …)."""

    __tablename__ = "artifacts"
    __table_args__ = (
        Index("ix_artifacts_run_id", "run_id"),
        UniqueConstraint("run_id", "kind", "path", name="uq_artifacts_run_id_kind_path"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(
        String(32),
        ForeignKey("runs.id", name="fk_artifacts_run_id_runs", ondelete="CASCADE"),
        nullable=False,
    )
    kind: Mapped[str] = mapped_column(String, nullable=False)
    path: Mapped[str] = mapped_column(String, nullable=False)
    meta: Mapped[dict[str, Any] | None] = mapped_column(_json(), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class JobRow(Base):
    """A queued unit of work; ``worker_id`` + ``heartbeat_at`` say who holds it and that it is alive."""

    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_priority", "status", "priority"), Index("ix_jobs_sweep_id", "sweep_id"))

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)
    run_id: Mapped[str | None] = mapped_column(
        String(32),
        ForeignKey("runs.id", name="fk_jobs_run_id_runs", ondelete="CASCADE"),
        nullable=True,
    )
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=3, server_default=text("3"))
    # Processes the job trains on (torchrun / mlx.launch on the worker's machine); 0 = all the worker offers.
    nproc: Mapped[int] = mapped_column(Integer, nullable=False, default=1, server_default=text("1"))
    # Submitted over the API: the folders its paths must stay in, checked again when a worker reads them.
    allowed_roots: Mapped[list[str] | None] = mapped_column(_json(), nullable=True)
    # A sweep's trial (migration 0008); an Optuna trial's number is set when a worker takes the job.
    sweep_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("sweeps.id", name="fk_jobs_sweep_id_sweeps", ondelete="CASCADE"), nullable=True
    )
    trial: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker_id: Mapped[str | None] = mapped_column(String, nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    cancel_requested: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class EventRow(Base):
    """What happened to a job or run, in order: ``type`` is metric | log | status; ``id`` is the cursor."""

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_run_id_id", "run_id", "id"), Index("ix_events_job_id_id", "job_id", "id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("jobs.id", name="fk_events_job_id_jobs", ondelete="CASCADE"), nullable=True
    )
    run_id: Mapped[str | None] = mapped_column(
        String(32), ForeignKey("runs.id", name="fk_events_run_id_runs", ondelete="CASCADE"), nullable=True
    )
    type: Mapped[str] = mapped_column(String, nullable=False)
    data: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class ApiKeyRow(Base):
    """An API key: only its SHA-256 is kept (keys are random, so a fast hash is enough)."""

    __tablename__ = "api_keys"
    __table_args__ = (UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String, nullable=False)
    prefix: Mapped[str] = mapped_column(String, nullable=False)
    key_hash: Mapped[str] = mapped_column(String, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class SecretRow(Base):
    """A secret (hub token, W&B key) encrypted with the key file under TUNELAB_HOME."""

    __tablename__ = "secrets"

    name: Mapped[str] = mapped_column(String, primary_key=True)
    ciphertext: Mapped[str] = mapped_column(Text, nullable=False)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class SweepRow(Base):
    """A search over config values; each trial is a job (and run) of the queue with ``sweep_id`` set."""

    __tablename__ = "sweeps"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str | None] = mapped_column(String, nullable=True)
    search: Mapped[str] = mapped_column(String, nullable=False)  # grid | optuna
    metric: Mapped[str] = mapped_column(String, nullable=False)
    direction: Mapped[str] = mapped_column(String, nullable=False)  # minimize | maximize
    # {dotted key: {"kind": "choice", "values": [...]} | {"kind": "interval", "low", "high", "log", "int"}}
    space: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, nullable=False)  # the base config, validated
    trials: Mapped[int] = mapped_column(Integer, nullable=False)
    study: Mapped[str | None] = mapped_column(String, nullable=True)  # the Optuna study's name
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
