"""Sweeps: one job per trial in the ordinary queue, so any worker (on any machine sharing the registry) runs them.

Everything that can be wrong with a sweep (an unknown key, an empty list, a value out of range in any
trial, an unknown search, a metric the runs never report) is found before the first job is queued: the
sweep and all its jobs are written in one transaction, or nothing is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunelab.config.load import load_config
from tunelab.config.schema import RunConfig
from tunelab.data.sources import resolve_files
from tunelab.errors import StateError
from tunelab.registry import jobs_repo, repo, sweeps_repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services import sweep_space
from tunelab.services.views import View
from tunelab.settings import get_settings
from tunelab.train import recipe
from tunelab.vocab import FINAL_STATUSES


class TrialView(View):
    """One trial of a sweep, as `sweep show --json` lists it."""

    rank: int | None  # 1 = best; None while it has no value for the metric
    trial: int | None  # grid: its index; optuna: the study's trial number once a worker has taken it
    job_id: str
    run_id: str | None
    status: str  # the job's status, or pruned
    params: dict[str, Any]
    value: float | None  # the metric's last reported value
    metrics: dict[str, float | None]
    config: dict[str, Any]


class SweepView(View):
    """A sweep and its trials, best first."""

    id: str
    name: str | None
    search: str
    metric: str
    direction: str
    space: dict[str, Any]
    trials: int
    study: str | None
    storage: str | None  # optuna.load_study(study_name=study, storage=storage) opens it
    created_at: str | None
    status: str  # queued | running | completed | cancelled (every trial final: completed or cancelled)
    best: TrialView | None
    results: list[TrialView]


def start_sweep(
    config: Path,
    items: Sequence[str],
    *,
    search: str = "grid",
    trials: int | None = None,
    metric: str = "val_loss",
    direction: str = "minimize",
    name: str | None = None,
    priority: int = 0,
) -> SweepView:
    """Check the sweep whole, then queue one job per trial (an Optuna trial's values are picked when it starts)."""
    space, fixed = sweep_space.parse_space(items)
    count = sweep_space.check_search(space, search, trials, direction)
    base = load_config(config, fixed)
    for params in sweep_space.corners(space):  # every value, validated as it will be trained
        load_config(config, [*fixed, *sweep_space.as_overrides(params)])
    sweep_space.check_metric(metric, has_valid=_has_valid(base), objective=base.objective.name)
    sweep_id = sweeps_repo.new_sweep_id()
    study = f"tunelab-{sweep_id}" if search == "optuna" else None
    planned = sweep_space.grid(space) if search == "grid" else [{} for _ in range(count)]
    configs = [_trial_config(config, fixed, params, base, sweep_id, name, i) for i, params in enumerate(planned)]
    engine = open_registry()
    storage = None
    if study is not None:
        from tunelab.services.sweep_trials import create_study

        storage = sweeps_repo.optuna_storage_url(engine)
        create_study(study, storage, direction)
    with session_scope(engine) as s:
        sweeps_repo.create_sweep(
            s,
            id=sweep_id,
            name=name,
            search=search,
            metric=metric,
            direction=direction,
            space=space,
            config=base.to_dict(),
            trials=count,
            study=study,
        )
        for i, cfg in enumerate(configs):
            _queue_trial(s, cfg, sweep_id, trial=i if search == "grid" else None, priority=priority)
    return show_sweep(sweep_id)


def _has_valid(cfg: RunConfig) -> bool:
    if cfg.data.valid or cfg.data.valid_split > 0:
        return True
    return resolve_files(cfg.data.train, None)[1] is not None


def _trial_config(
    config: Path, fixed: list[str], params: dict[str, Any], base: RunConfig, sweep_id: str, name: str | None, i: int
) -> RunConfig:
    """A trial's config: the file, the fixed overrides, its own values; its own name and output folder."""
    extra = sweep_space.as_overrides(params)
    if base.name is None:
        extra += sweep_space.as_overrides({"name": f"{name or sweep_id}-trial-{i}"})
    if base.output_dir:  # one folder each, inside the one the config names
        extra += sweep_space.as_overrides({"output_dir": str(Path(base.output_dir) / f"trial-{i}")})
    return load_config(config, [*fixed, *extra])


def _queue_trial(s: Any, cfg: RunConfig, sweep_id: str, *, trial: int | None, priority: int) -> None:
    """The trial's run (queued) and job, as `jobs submit` makes them, marked as the sweep's."""
    run_id = repo.new_run_id()
    output_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else get_settings().runs_dir / run_id
    recipe.check_fresh_output(output_dir, cfg)
    repo.create_run(s, run_id=run_id, config=cfg.to_dict(), output_dir=str(output_dir), name=cfg.name)
    job = jobs_repo.create_job(
        s, job_id=jobs_repo.new_job_id(), kind="train", config=cfg.to_dict(), run_id=run_id, priority=priority
    )
    sweeps_repo.join_sweep(s, job_id=job.id, run_id=run_id, sweep_id=sweep_id, trial=trial)
    jobs_repo.add_event(s, type="status", data={"status": "queued", "sweep": sweep_id}, job_id=job.id, run_id=run_id)


def show_sweep(sweep_text: str) -> SweepView:
    """A sweep with its trials ranked by its metric (best first; trials without a value last)."""
    engine = open_registry()
    with session_scope(engine) as s:
        row = sweeps_repo.get_sweep(s, sweeps_repo.resolve_sweep_id(s, sweep_text))
        sweep = sweeps_repo.sweep_public(row)
        jobs = [
            (job, repo.latest_metrics(s, job.run_id) if job.run_id else {}) for job in sweeps_repo.trial_jobs(s, row.id)
        ]
        results = [_trial(job, metrics, sweep) for job, metrics in jobs]
    storage = sweeps_repo.optuna_storage_url(engine) if sweep["study"] else None
    if storage is not None:
        from tunelab.services.sweep_trials import pruned_trials

        pruned = pruned_trials(sweep["study"], storage)
        results = [r.model_copy(update={"status": "pruned"}) if r.trial in pruned else r for r in results]
    ranked = _ranked(results, sweep["direction"])
    best = next((r for r in ranked if r.status == "completed" and r.value is not None), None)
    statuses = {r.status for r in ranked}
    status = next((s for s in ("running", "queued", "cancelled") if s in statuses), "completed")
    sweep.pop("config")
    shown = sweeps_repo.public_url(storage) if storage else None
    return SweepView(**sweep, storage=shown, status=status, best=best, results=ranked)


def _trial(job: Any, metrics: dict[str, float | None], sweep: dict[str, Any]) -> TrialView:
    params = {key: _dotted(job.config, key) for key in sweep["space"]} if job.trial is not None else {}
    return TrialView(
        rank=None,
        trial=job.trial,
        job_id=job.id,
        run_id=job.run_id,
        status=job.status,
        params=params,
        value=metrics.get(sweep["metric"]),
        metrics=metrics,
        config=job.config,
    )


def _ranked(results: list[TrialView], direction: str) -> list[TrialView]:
    sign = 1.0 if direction == "minimize" else -1.0
    order = {"completed": 0, "pruned": 1}

    def key(r: TrialView) -> tuple[int, float]:
        if r.value is None:
            return (3, 0.0)
        return (order.get(r.status, 2), sign * r.value)

    ordered = sorted(results, key=key)
    return [r.model_copy(update={"rank": i + 1 if r.value is not None else None}) for i, r in enumerate(ordered)]


def _dotted(config: dict[str, Any], key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def list_sweeps(*, limit: int = 100) -> list[SweepView]:
    """The newest sweeps, newest first."""
    with session_scope(open_registry()) as s:
        ids = [row.id for row in sweeps_repo.list_sweeps(s, limit=limit)]
    return [show_sweep(i) for i in ids]


def cancel_sweep(sweep_text: str) -> SweepView:
    """Cancel a sweep: its queued trials at once, its running ones at their next step (they checkpoint)."""
    from tunelab.jobs import queue

    with session_scope(open_registry()) as s:
        sweep_id = sweeps_repo.resolve_sweep_id(s, sweep_text)
        open_jobs = [job.id for job in sweeps_repo.trial_jobs(s, sweep_id) if job.status not in FINAL_STATUSES]
    for job_id in open_jobs:
        try:
            queue.cancel(job_id)
        except StateError:  # it ended meanwhile
            continue
    return show_sweep(sweep_id)
