"""Jobs: submit to the queue, run a claimed job, its events, cancel; and what pollers read."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.load import validate_config
from tunelab.config.schema import RunConfig
from tunelab.errors import ConfigError
from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services.runs import resume_run
from tunelab.services.views import JobView, MetricPoint
from tunelab.settings import get_settings
from tunelab.train import recipe
from tunelab.vocab import FINAL_STATUSES, JOB_KINDS


def submit_job(
    cfg: RunConfig,
    *,
    kind: str = "train",
    priority: int = 0,
    allowed_roots: Sequence[Path] | None = None,
    nproc: int = 1,
) -> JobView:
    """Queue ``cfg`` for a worker; a train job gets its (queued) run at once, so its id is known.

    ``nproc`` processes train it (batch_size is per process); 0 = all its worker offers.

    ``allowed_roots`` (the API passes them) confines every path in the config to those folders.
    """
    from tunelab.registry import jobs_repo
    from tunelab.security.paths import check_config_paths

    if kind not in JOB_KINDS:
        raise ConfigError(f"job kind must be one of {', '.join(JOB_KINDS)} (got {kind!r})")
    if nproc < 0:
        raise ConfigError(f"nproc must be 1 or more, or auto (got {nproc})")
    if allowed_roots is not None:
        cfg = check_config_paths(cfg, allowed_roots)  # absolute from here on: the worker reads what was checked
        _check_api_output(cfg)
        if any(":" in r.name for r in cfg.objective.rewards or []):  # it would import code the client names
            raise ConfigError(
                "objective.rewards: your own module:function rewards run only from the CLI, not over the API",
                hint="use the built-in rewards here, or run tunelab train on the server",
            )
    run_id = None
    with session_scope(open_registry()) as s:
        if kind == "train":  # checked, not created: nothing is written until a worker runs it
            run_id = repo.new_run_id()
            output_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else get_settings().runs_dir / run_id
            recipe.check_fresh_output(output_dir, cfg)
            repo.create_run(s, run_id=run_id, config=cfg.to_dict(), output_dir=str(output_dir), name=cfg.name)
        job = jobs_repo.create_job(
            s,
            job_id=jobs_repo.new_job_id(),
            kind=kind,
            config=cfg.to_dict(),
            run_id=run_id,
            priority=priority,
            nproc=nproc if kind == "train" else 1,
            allowed_roots=[str(r) for r in allowed_roots] if allowed_roots is not None else None,
        )
        jobs_repo.add_event(s, type="status", data={"status": "queued"}, job_id=job.id, run_id=run_id)
        return JobView(**jobs_repo.job_public(job))


def _check_api_output(cfg: RunConfig) -> None:
    """Over the API a run writes only under the runs folder: the other allowed roots hold models and data."""
    if not cfg.output_dir:
        return
    runs = get_settings().runs_dir.expanduser().resolve()
    out = Path(cfg.output_dir).expanduser().resolve()
    if out != runs and runs not in out.parents:
        raise ConfigError(
            f"output_dir must be inside {runs} for jobs submitted over the API",
            hint="leave output_dir out: the run gets a folder of its own there",
        )


def run_job(job_id: str, *, callbacks: Sequence[Any] = (), should_stop: Callable[[], bool] = lambda: False) -> str:
    """Do a claimed job's work in this process; returns ``completed`` or ``stopped``.

    Training always continues from the run's newest checkpoint, so a job taken
    over from a dead worker resumes instead of starting again.
    """
    from tunelab.registry import jobs_repo
    from tunelab.services.datasets import validate_dataset

    with session_scope(open_registry()) as s:
        job = jobs_repo.get_job(s, job_id)
        kind, run_id, config, roots = job.kind, job.run_id, dict(job.config), job.allowed_roots
        trained = run_id is not None and repo.get_run(s, run_id).status == "completed"
        swept = job.sweep_id is not None
    if kind == "eval":  # its config is an eval request, not a run config
        from tunelab.services.eval_jobs import run_eval_job

        def log(text: str) -> None:
            record_job_event(job_id, None, "log", {"text": text})

        return run_eval_job(job_id, config, roots, log=log, should_stop=should_stop)
    if roots is not None:  # submitted over the API: its files must still be where they were accepted
        from tunelab.security.paths import recheck_config_paths

        recheck_config_paths(validate_config(config), [Path(r) for r in roots])
    if kind == "validate" or run_id is None:
        cfg = validate_config(config)
        report = validate_dataset(
            cfg.data.train, valid=cfg.data.valid, fmt=cfg.data.format, max_seq_len=cfg.data.max_seq_len
        )
        counts = ", ".join(f"{k}: {v['records']} records" for k, v in report.splits.items())
        record_job_event(job_id, None, "log", {"text": f"ok: format {report.format}; {counts}"})
        return "completed"
    if trained:
        return "completed"  # its worker died after training but before recording the job's end
    if swept:  # a sweep's trial: Optuna picks its values now, prunes it, and is told how it ended
        from tunelab.services.sweep_trials import run_trial

        return run_trial(job_id, run_id, callbacks=callbacks, should_stop=should_stop, write=_write_config_once)
    _write_config_once(run_id, config)
    outcome = resume_run(run_id, callbacks=callbacks, should_stop=should_stop)
    return "completed" if outcome.status == "completed" else "stopped"


def _write_config_once(run_id: str, config: dict[str, Any]) -> None:
    """The run folder's config.yaml, as submitted, written when a worker first takes the job."""
    with session_scope(open_registry()) as s:
        output_dir = Path(repo.get_run(s, run_id).output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not (output_dir / "config.yaml").exists():
        (output_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")


def record_job_event(job_id: str | None, run_id: str | None, type: str, data: dict[str, Any]) -> None:
    """Append a metric | log | status event for a job and/or run."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        jobs_repo.add_event(s, type=type, data=data, job_id=job_id, run_id=run_id)


def list_jobs(*, status: str | None = None, limit: int = 200) -> list[JobView]:
    """The newest jobs, newest first."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        return [JobView(**jobs_repo.job_public(row)) for row in jobs_repo.list_jobs(s, status=status, limit=limit)]


def show_job(job_text: str) -> JobView:
    """One job, by id or unique prefix."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        return JobView(**jobs_repo.job_public(jobs_repo.get_job(s, jobs_repo.resolve_job_id(s, job_text))))


def cancel_job(job_text: str) -> JobView:
    """Cancel a queued job, or ask the worker of a running one to checkpoint and stop."""
    from tunelab.jobs import queue

    return JobView(**queue.cancel(job_text))


def job_events(job_text: str, *, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """A job's events (status changes, logs, metrics) with ``id > after``."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        job_id = jobs_repo.resolve_job_id(s, job_text)
        return jobs_repo.events_after(s, job_id=job_id, after=after, limit=limit)


def run_events(
    run_text: str, *, after: int = 0, limit: int = 500, types: Collection[str] | None = None
) -> list[dict[str, Any]]:
    """A run's events with ``id > after`` (what the WebSocket sends); ``types``: only events of those types."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        run_id = repo.resolve_run_id(s, run_text)
        return jobs_repo.events_after(s, run_id=run_id, after=after, limit=limit, types=types)


def run_metrics(run_text: str) -> list[MetricPoint]:
    """Every metric point of a run (``step``, ``name``, ``value``), in step order."""
    with session_scope(open_registry()) as s:
        return [MetricPoint(**point) for point in repo.metric_history(s, repo.resolve_run_id(s, run_text))]


def run_status(run_id: str) -> str:
    """A run's status, cheap enough to poll; a run trained by a job isn't over until its job has recorded the end."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        status = repo.get_run(s, run_id).status
        job = jobs_repo.job_for_run(s, run_id)
        if job is not None and job.status not in FINAL_STATUSES:
            return job.status
        return status


def job_service(server: str | None) -> Any:
    """Where the job functions run: this module (the local registry), or a `tunelab serve` at ``server``.

    Both offer submit_job, list_jobs, show_job, cancel_job and job_events, returning the same views.
    """
    if server:
        from tunelab.services.remote import ApiClient

        return ApiClient(server)
    import tunelab.services.jobs as local

    return local


def parse_nproc(text: str | int, *, flag: str = "--nproc") -> int:
    """``N`` (1 or more) or ``auto`` (0: every process the worker offers)."""
    from tunelab.jobs.ranks import parse_nproc as parse

    return parse(text, flag=flag)


def run_worker(
    *,
    heartbeat: float,
    stale_after: float,
    poll: float,
    max_jobs: int | None,
    exit_when_idle: bool,
    nproc: str,
    say: Callable[[str], None],
) -> int:
    """Run queued jobs in this process until stopped (SIGTERM/Ctrl-C); returns how many it ran.

    Each job runs :func:`run_job` in a child process (or ``nproc`` ranks), handed to the worker here,
    so the queue machinery never imports the use cases it runs.
    """
    from tunelab.jobs.ranks import offered_nproc
    from tunelab.jobs.worker import WorkerOptions
    from tunelab.jobs.worker import run_worker as run

    if heartbeat <= 0 or stale_after <= heartbeat:
        raise ConfigError("--heartbeat must be > 0 and --stale-after longer than --heartbeat")
    options = WorkerOptions(heartbeat, stale_after, poll, max_jobs, exit_when_idle, offered_nproc(nproc))
    return run(options, work=run_job, say=say)


def run_rank(job_id: str, run_id: str | None) -> None:  # pragma: no cover - runs in torchrun's ranks
    """One rank of a job a worker launched on several processes; exits the process when done."""
    from tunelab.jobs.child import rank_main

    rank_main(run_job, job_id, run_id)
