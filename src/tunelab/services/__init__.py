"""Use cases: what the CLI, the API and the dashboard call.  Each is one function.

Grouped by noun (runs, jobs, exports, uploads); import them from here.
"""

from tunelab.services.exports import export_run
from tunelab.services.jobs import (
    cancel_job,
    job_events,
    list_jobs,
    record_job_event,
    run_events,
    run_job,
    run_metrics,
    run_status,
    show_job,
    submit_job,
)
from tunelab.services.runs import RegistryCallback, RunOutcome, list_runs, resume_run, show_run, start_run
from tunelab.services.uploads import served_models, upload_dataset

__all__ = [
    "RegistryCallback",
    "RunOutcome",
    "cancel_job",
    "export_run",
    "job_events",
    "list_jobs",
    "list_runs",
    "record_job_event",
    "resume_run",
    "run_events",
    "run_job",
    "run_metrics",
    "run_status",
    "served_models",
    "show_job",
    "show_run",
    "start_run",
    "submit_job",
    "upload_dataset",
]
