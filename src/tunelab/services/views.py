"""What services hand back: typed, frozen views whose JSON form is the CLI's ``--json`` and the API's body.

Each view is a pydantic model, so the API builds its response schemas from
them and the CLI prints ``view.to_dict()``; the fields are the public contract
(names only ever grow).  Views also read like the JSON they print
(``run["status"]`` as well as ``run.status``), for scripts written against the
dict shape tunelab returned before it had views.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class View(BaseModel):
    """A read-only result; ``to_dict()`` is its JSON form."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types, in field order."""
        return self.model_dump(mode="json")

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        """The field's value, or ``default`` when the view has no such field."""
        return getattr(self, key) if key in type(self).model_fields else default


class ModelRecord(View):
    """The base model a run trained."""

    path: str
    architecture: str | None = None
    num_params: int | None = None


class DatasetRecord(View):
    """The dataset a run trained on, as the registry recorded it."""

    path: str
    content_hash: str | None = None
    format: str | None = None
    num_train: int | None = None
    num_valid: int | None = None
    cache_key: str | None = None
    stats: dict[str, Any] | None = None


class ArtifactView(View):
    kind: str
    path: str
    meta: dict[str, Any] | None = None
    created_at: str | None = None


class RunView(View):
    """One run: what `tunelab runs show --json` prints and `GET /v1/runs/{id}` returns."""

    id: str
    name: str | None
    status: str
    backend: str | None
    device: str | None
    backend_reason: str | None
    config: dict[str, Any]
    output_dir: str
    chat_template: str | None
    step: int | None
    total_steps: int | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    error: str | None
    model: ModelRecord | None
    dataset: DatasetRecord | None
    metrics: dict[str, float | None]
    final_metrics: dict[str, Any] | None
    peak_memory_bytes: int | None
    estimated_memory_bytes: int | None
    memory_backoffs: list[dict[str, Any]] = []  # out-of-memory back-offs: step, micro_batch_size, grad_accum, reason
    artifacts: dict[str, Any]
    artifact_list: list[ArtifactView]
    missing: list[str] = []  # the run's folder or results, gone from disk since it wrote them (deleted or moved)

    @property
    def base_model(self) -> str:
        """The model path the run's config names (a hub id or a folder)."""
        return str(self.config["model"]["path"])

    @property
    def base_revision(self) -> str | None:
        return self.config["model"].get("revision")

    @property
    def method(self) -> str:
        return str(self.config.get("method", {}).get("name", "lora"))

    @property
    def trained_format(self) -> str:
        """The record format it trained on (the detected one when the config said auto)."""
        return (self.dataset.format if self.dataset else None) or str(self.config["data"]["format"])


class JobView(View):
    """One job: what `tunelab jobs show --json` prints and `/v1/jobs` returns."""

    id: str
    kind: str
    status: str
    run_id: str | None
    priority: int
    attempts: int
    max_attempts: int
    nproc: int = 1  # 0: all the worker offers
    worker_id: str | None
    heartbeat_at: str | None
    cancel_requested: bool
    error: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    config: dict[str, Any]


class MetricPoint(View):
    step: int
    name: str
    value: float | None


class KeyView(View):
    """An API key's public record (the key itself is never stored)."""

    id: int
    name: str
    prefix: str
    created_at: str | None
    last_used_at: str | None
    revoked_at: str | None


class UploadedDataset(View):
    """An uploaded dataset: use ``path`` as ``data.train`` in a job's config."""

    id: str
    path: str
    format: str
    size_bytes: int
    splits: dict[str, Any]


class DatasetReport(View):
    """What `tunelab data validate` found: the format and, per split, counts, duplicates and token lengths."""

    format: str
    splits: dict[str, Any]
    chat_template: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out["chat_template"] is None:
            del out["chat_template"]  # only reported with --model, as before
        return out


class CacheEntry(View):
    """One tokenized dataset in the cache (``rows`` is None for an unreadable or half-built one)."""

    key: str
    size_bytes: int
    rows: dict[str, int] | None
    modified: float


class CacheCleared(View):
    removed: int
    bytes: int


class ServedModel(View):
    """A finished run that chat completions can serve, as ``run:RUN_ID``."""

    id: str
    created: int
    base_model: str | None = None


class SystemReport(View):
    """What `tunelab doctor --json` prints: hardware, packages, the auto choice, capabilities, MLX's BLAS."""

    hardware: dict[str, Any]
    installed: dict[str, str | None]
    auto: dict[str, Any]
    capabilities: list[dict[str, Any]]
    mlx_blas: dict[str, Any] | None
