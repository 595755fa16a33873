"""Use cases: what the CLI, the API and the dashboard call — the only door into tunelab's core.

One module per noun (runs, jobs, datasets, models, estimates, exports, keys, system,
quickstart); each use case is one function returning a typed view (:mod:`.views`).
Import them from here.
"""

from tunelab.services.datasets import (
    cache_entries,
    cache_root,
    clear_cache,
    preview_dataset,
    upload_dataset,
    uploaded_datasets,
    validate_dataset,
)
from tunelab.services.estimates import estimate_memory
from tunelab.services.exports import export_run
from tunelab.services.jobs import (
    cancel_job,
    job_events,
    job_service,
    list_jobs,
    parse_nproc,
    record_job_event,
    run_events,
    run_job,
    run_metrics,
    run_rank,
    run_status,
    run_worker,
    show_job,
    submit_job,
)
from tunelab.services.keys import create_key, list_keys, list_secrets, revoke_key, set_secret, verify_key
from tunelab.services.models import (
    convert_checkpoint,
    generator_for_run,
    lineage,
    load_generator,
    new_usage,
    resolve_served,
    served_models,
    stream_chat,
)
from tunelab.services.runs import RegistryCallback, RunOutcome, list_runs, resume_run, show_run, start_run
from tunelab.services.system import doctor
from tunelab.services.views import (
    CacheEntry,
    DatasetReport,
    JobView,
    KeyView,
    MetricPoint,
    RunView,
    ServedModel,
    SystemReport,
    UploadedDataset,
)

__all__ = [
    "CacheEntry",
    "DatasetReport",
    "JobView",
    "KeyView",
    "MetricPoint",
    "RegistryCallback",
    "RunOutcome",
    "RunView",
    "ServedModel",
    "SystemReport",
    "UploadedDataset",
    "cache_entries",
    "cache_root",
    "cancel_job",
    "clear_cache",
    "convert_checkpoint",
    "create_key",
    "doctor",
    "estimate_memory",
    "export_run",
    "generator_for_run",
    "job_events",
    "job_service",
    "lineage",
    "list_jobs",
    "list_keys",
    "list_runs",
    "list_secrets",
    "load_generator",
    "new_usage",
    "parse_nproc",
    "preview_dataset",
    "record_job_event",
    "resolve_served",
    "resume_run",
    "revoke_key",
    "run_events",
    "run_job",
    "run_metrics",
    "run_rank",
    "run_status",
    "run_worker",
    "served_models",
    "set_secret",
    "show_job",
    "show_run",
    "start_run",
    "stream_chat",
    "submit_job",
    "upload_dataset",
    "uploaded_datasets",
    "validate_dataset",
    "verify_key",
]
