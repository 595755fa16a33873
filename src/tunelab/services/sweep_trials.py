"""A sweep's trial inside a worker: Optuna picks its values when it starts, prunes it, and is told how it ended.

The study lives in tunelab's database (see :func:`tunelab.registry.sweeps_repo.optuna_storage_url`), so
workers on several machines share one study.  A job holds its trial's number once asked, so a trial
taken over from a dead worker continues as the same Optuna trial instead of asking for a new one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tunelab.config.load import load_config
from tunelab.registry import jobs_repo, repo, sweeps_repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services import sweep_space
from tunelab.train.callbacks import BaseCallback


def _pruner(trials: int) -> Any:
    """Median pruning once a few trials have finished: a trial is stopped at a validation whose value is
    worse than the median of the earlier trials' values at that step."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=max(2, min(5, trials // 4)), n_warmup_steps=0)


def create_study(name: str, storage: str, direction: str) -> None:
    """Create the sweep's study (TPE is the sampler every worker loads it with)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    optuna.create_study(study_name=name, storage=storage, direction=direction)  # type: ignore[arg-type]


def _load(name: str, storage: str, trials: int) -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.load_study(
        study_name=name, storage=storage, sampler=optuna.samplers.TPESampler(), pruner=_pruner(trials)
    )


def pruned_trials(name: str, storage: str) -> set[int]:
    """Numbers of the study's trials that were pruned."""
    import optuna

    study = _load(name, storage, 1)
    return {t.number for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.PRUNED,))}


class PruneCallback(BaseCallback):
    """Report the sweep's metric to the trial at each validation; ask whether to stop it there."""

    def __init__(self, trial: Any, metric: str) -> None:
        self.trial, self.metric = trial, metric
        self.pruned_at: int | None = None
        self.total_steps = 0

    def on_start(self, *, step: int, total_steps: int) -> None:
        self.total_steps = total_steps

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if value is None or self.pruned_at is not None:
            return
        self.trial.report(float(value), step)
        # At the last step the trial has finished anyway: it completes, with its value, rather than being pruned.
        if step < self.total_steps and self.trial.should_prune():
            self.pruned_at = step


@dataclass
class Trial:
    """What a sweep adds to its job's run: the (sampled) config, callbacks, a stop switch, the report."""

    job_id: str
    config: dict[str, Any]
    callbacks: Sequence[BaseCallback] = ()
    end: Callable[[Any], str] = field(default=lambda outcome: _status(outcome))

    def stop_when(self, should_stop: Callable[[], bool]) -> Callable[[], bool]:
        """The job's own stop switch, or a pruning decision."""
        pruners = [c for c in self.callbacks if isinstance(c, PruneCallback)]
        return lambda: should_stop() or any(p.pruned_at is not None for p in pruners)


def begin_trial(job_id: str) -> Trial:
    """The trial a worker is starting: a grid trial as queued; an Optuna trial asked of the study now."""
    with session_scope(open_registry()) as s:
        job = jobs_repo.get_job(s, job_id)
        sweep = sweeps_repo.sweep_public(sweeps_repo.get_sweep(s, job.sweep_id or ""))
        number, config = job.trial, dict(job.config)
    if sweep["search"] != "optuna":
        return Trial(job_id, config)
    storage = sweeps_repo.optuna_storage_url(open_registry())
    study = _load(sweep["study"], storage, sweep["trials"])
    trial = _resume(study, storage, sweep["study"], number) if number is not None else None
    if trial is None:
        trial = study.ask(_distributions(sweep["space"]))
        config = _sampled_config(sweep["space"], config, trial.params)
        with session_scope(open_registry()) as s:
            sweeps_repo.set_trial(s, job_id=job_id, trial=trial.number, config=config)
    prune = PruneCallback(trial, sweep["metric"])
    return Trial(job_id, config, [prune], end=lambda outcome: _tell(study, trial, prune, sweep["metric"], outcome))


def _resume(study: Any, storage: str, name: str, number: int) -> Any:
    """The job's Optuna trial again (its worker died): the same trial goes on."""
    import optuna

    store = optuna.storages.RDBStorage(storage)
    trial_id = store.get_trial_id_from_study_id_trial_number(store.get_study_id_from_name(name), number)
    return optuna.trial.Trial(study, trial_id)


def _distributions(space: dict[str, Any]) -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out: dict[str, Any] = {}
    for key, dim in space.items():
        if dim["kind"] == "interval":
            kind = IntDistribution if dim["int"] else FloatDistribution
            out[key] = kind(dim["low"], dim["high"], log=dim["log"])
        else:  # Optuna's choices are plain scalars: lists and mappings travel as JSON text
            out[key] = CategoricalDistribution([json.dumps(v) for v in dim["values"]])
    return out


def _sampled_config(space: dict[str, Any], queued: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """The queued config (its own name and folder) with the values the sampler picked."""
    values = {k: json.loads(v) if space[k]["kind"] == "choice" else v for k, v in params.items() if k in space}
    return load_config(queued, sweep_space.as_overrides(values)).to_dict()


def _tell(study: Any, trial: Any, prune: PruneCallback, metric: str, outcome: Any) -> str:
    """Tell the study how the trial ended; the job's status (a pruned trial's job completed its work)."""
    import optuna

    if prune.pruned_at is not None:
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        with session_scope(open_registry()) as s:
            repo.update_run(s, outcome.run_id, error=f"pruned by the sweep at step {prune.pruned_at}")
        return "completed"
    if outcome.status != "completed":
        return "stopped"  # cancelled or handed back: the trial goes on when the job does
    with session_scope(open_registry()) as s:
        value = repo.latest_metrics(s, outcome.run_id).get(metric)
    if value is None:
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
    else:
        study.tell(trial, value)
    return "completed"


def run_trial(
    job_id: str,
    run_id: str,
    *,
    callbacks: Sequence[Any],
    should_stop: Callable[[], bool],
    write: Callable[[str, dict[str, Any]], None],
) -> str:
    """Train a sweep's trial as a job's run (``write`` puts its config in the run folder); the job's status."""
    from tunelab.services.runs import resume_run

    trial = begin_trial(job_id)
    write(run_id, trial.config)
    try:
        outcome = resume_run(run_id, callbacks=[*callbacks, *trial.callbacks], should_stop=trial.stop_when(should_stop))
    except BaseException:
        _fail(trial)
        raise
    return trial.end(outcome)


def _fail(trial: Trial) -> None:
    """A trial whose run raised: Optuna counts it failed (its sampler then avoids the spot)."""
    import optuna

    prune = next((c for c in trial.callbacks if isinstance(c, PruneCallback)), None)
    if prune is not None:
        prune.trial.study.tell(prune.trial, state=optuna.trial.TrialState.FAIL)


def _status(outcome: Any) -> str:
    return "completed" if outcome.status == "completed" else "stopped"
