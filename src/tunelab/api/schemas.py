"""Request and response bodies (separate from the ORM rows and from the run config).

Responses are the services' views (the same fields `--json` prints), named for the API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.services.views import JobView, MetricPoint, RunView, ServedModel, UploadedDataset


class JobCreate(BaseModel):
    """``config`` is the same mapping a YAML config file holds; it is validated the same way."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    kind: Literal["train", "validate"] = "train"
    priority: int = Field(0, ge=-1000, le=1000)
    nproc: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1  # processes; batch_size is per process


class JobPublic(JobView):
    """A job, as `tunelab jobs show --json` prints it."""


class RunPublic(RunView):
    """A run, exactly as `tunelab runs show RUN --json` prints it."""


class DatasetPublic(UploadedDataset):
    """An uploaded dataset: use ``path`` as ``data.train`` in a job's config."""


class ModelPublic(ServedModel):
    """A servable run in OpenAI's model shape."""

    object: Literal["model"] = "model"
    owned_by: str = "tunelab"


__all__ = ["ChatMessage", "ChatRequest", "DatasetPublic", "JobCreate", "JobPublic", "MetricPoint", "ModelList"]
__all__ += ["ModelPublic", "RunPublic"]


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
