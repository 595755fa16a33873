"""An Optuna sweep's study lives beside tunelab's registry, on SQLite and on a real PostgreSQL server.

No training here: a worker's first step for an Optuna trial (asking the study for its values and
writing them into the job's and run's config) is run directly, then the study is opened with Optuna.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import yaml

from tunelab import services
from tunelab.services import sweeps
from tunelab.services.sweep_trials import begin_trial


def test_an_optuna_study_in_the_registry_database(registry_url: str, tmp_path: Path, chat_data: Path) -> None:
    config = tmp_path / "cfg.yaml"
    raw = {"model": {"path": "org/model"}, "data": {"train": str(chat_data)}, "train": {"steps": 3, "eval_every": 1}}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    sweep = sweeps.start_sweep(
        config, ["train.lr=tag(log,interval(1e-5,1e-2))", "method.targets=[q_proj],[q_proj,v_proj]"],
        search="optuna", trials=3,
    )  # fmt: skip
    assert sweep.storage is not None and sweep.study is not None
    if registry_url.startswith("postgresql"):
        assert sweep.storage.startswith(registry_url) and "search_path%3Doptuna" in sweep.storage
    study = optuna.load_study(study_name=sweep.study, storage=sweep.storage)
    assert study.trials == [] and study.direction == optuna.study.StudyDirection.MINIMIZE

    first = sweep.results[0]
    trial = begin_trial(first.job_id)  # what a worker does when it takes the job
    lr, targets = trial.config["train"]["lr"], trial.config["method"]["targets"]
    assert 1e-5 <= lr <= 1e-2 and targets in (["q_proj"], ["q_proj", "v_proj"])
    assert services.show_run(first.run_id).config["train"]["lr"] == lr

    shown = {r.job_id: r for r in sweeps.show_sweep(sweep.id).results}[first.job_id]
    assert shown.trial == 0 and shown.params == {"train.lr": lr, "method.targets": targets}
    (asked,) = optuna.load_study(study_name=sweep.study, storage=sweep.storage).trials
    assert asked.state == optuna.trial.TrialState.RUNNING and asked.params["train.lr"] == lr
    # its worker died: the next one to take the job continues the same trial instead of asking anew
    again = begin_trial(first.job_id)
    assert again.config == trial.config
    assert len(optuna.load_study(study_name=sweep.study, storage=sweep.storage).trials) == 1

    cancelled = sweeps.cancel_sweep(sweep.id)
    assert {r.status for r in cancelled.results} == {"cancelled"} and cancelled.status == "cancelled"
