"""Request and response bodies (separate from the ORM rows and from the run config).

Responses are the services' views (the same fields `--json` prints), named for the API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tunelab.services.views import JobView, MetricPoint, RunView, ServedModel, UploadedDataset
from tunelab.vocab import EVAL_METRICS, MetricName


class JobCreate(BaseModel):
    """``config`` is the same mapping a YAML config file holds; it is validated the same way."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any]
    kind: Literal["train", "validate"] = "train"  # an eval is queued with POST /v1/runs/{run_id}/evals
    priority: int = Field(0, ge=-1000, le=1000)
    nproc: Annotated[int, Field(ge=1, le=1024)] | Literal["auto"] = 1  # processes; batch_size is per process


class EvalCreate(BaseModel):
    """An eval of a finished run, queued as a job: the same choices as `tunelab eval RUN_ID`."""

    model_config = ConfigDict(extra="forbid")
    data: str | None = Field(None, description="held-out file under the allowed folders (default: the run's)")
    metrics: list[MetricName] = Field(
        default=["exact_match", "contains", "bleu", "rouge_l"], min_length=1, max_length=len(EVAL_METRICS)
    )
    base: bool = True
    limit: int | None = Field(None, ge=1, le=100_000)
    max_new_tokens: int = Field(128, ge=1, le=4096)
    priority: int = Field(0, ge=-1000, le=1000)


class EvalPage(BaseModel):
    """A run's newest eval: its scores, the base's, and one page of its per-example answers."""

    run_id: str
    path: str
    data: str | None
    scores: dict[str, float]
    base_scores: dict[str, float] | None
    offset: int
    total: int
    examples: list[dict[str, Any]]
    missing: bool


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
__all__ += ["EvalCreate", "EvalPage", "ModelPublic", "RunPublic"]


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
