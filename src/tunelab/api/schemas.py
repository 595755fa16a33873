"""Request and response bodies (separate from the ORM rows and from the run config)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class JobCreate(BaseModel):
    """``config`` is the same mapping a YAML config file holds; it is validated the same way."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    kind: Literal["train", "validate"] = "train"
    priority: int = Field(0, ge=-1000, le=1000)
    nproc: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1  # processes; batch_size is per process


class JobPublic(BaseModel):
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


class MetricPoint(BaseModel):
    step: int
    name: str
    value: float | None


class DatasetPublic(BaseModel):
    """An uploaded dataset: use ``path`` as ``data.train`` in a job's config."""

    id: str
    path: str
    format: str
    size_bytes: int
    splits: dict[str, Any]


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tunelab"
    base_model: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request, limited to what a local model can honour."""

    model: str = Field(description='"run:RUN_ID": the run\'s base model with its adapter')
    messages: list[ChatMessage] = Field(min_length=1, max_length=200)
    max_tokens: int = Field(128, ge=1, le=4096)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int = Field(0, ge=0, le=2**31 - 1)
    stream: bool = False
