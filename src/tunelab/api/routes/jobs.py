"""`/v1/jobs`: queue configs, follow and cancel them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, status

from tunelab import services
from tunelab.api.deps import SettingsDep
from tunelab.api.responses import errors
from tunelab.api.schemas import JobCreate, JobPublic
from tunelab.config.load import validate_config
from tunelab.vocab import JOB_STATUSES

router = APIRouter(prefix="/jobs", tags=["jobs"])
StatusFilter = Annotated[str | None, Query(pattern="^(" + "|".join(JOB_STATUSES) + ")$")]
Limit = Annotated[int, Query(ge=1, le=1000)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic, responses=errors(409, 507))
def submit_job(body: JobCreate, settings: SettingsDep) -> dict[str, Any]:
    """Queue a job; a bad config is a 422 naming the key, a path outside the allowed roots too."""
    cfg = validate_config(body.config)
    nproc = 0 if body.nproc == "auto" else body.nproc
    return services.submit_job(
        cfg, kind=body.kind, priority=body.priority, allowed_roots=settings.allowed_roots, nproc=nproc
    ).to_dict()


@router.get("", response_model=list[JobPublic])
def list_jobs(status: StatusFilter = None, limit: Limit = 200) -> list[dict[str, Any]]:
    """Newest jobs first."""
    return [job.to_dict() for job in services.list_jobs(status=status, limit=limit)]


@router.get("/{job_id}", response_model=JobPublic, responses=errors(404))
def show_job(job_id: str) -> dict[str, Any]:
    return services.show_job(job_id).to_dict()


@router.post("/{job_id}/cancel", response_model=JobPublic, responses=errors(404, 409))
def cancel_job(job_id: str) -> dict[str, Any]:
    """Cancel a queued job at once, or ask the worker to checkpoint and stop a running one."""
    return services.cancel_job(job_id).to_dict()


@router.get("/{job_id}/events", responses=errors(404))
def job_events(
    job_id: str, after: Annotated[int, Query(ge=0, le=2**62)] = 0, limit: Limit = 500
) -> list[dict[str, Any]]:
    """The job's status changes, log lines and metrics with ``id > after`` (poll with the last id)."""
    return services.job_events(job_id, after=after, limit=limit)
