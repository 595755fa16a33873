"""An Optuna sweep through two real workers: TPE picks each trial's values as a worker takes it, the
median pruner stops poor trials at a validation, and the study is an ordinary Optuna study.

Ten trials: the pruner starts after 2 finished ones at this size, so the chance that no trial is pruned
(each later one better than the median before it) is about 0.3%, near the 0.2% of the 12 trials this
test ran before, at two trials (~15 s) less."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from tests.conftest import run_cli
from tests.jobs.conftest import sweep_config, two_workers

TRIALS = 10


@pytest.mark.slow
def test_an_optuna_sweep_of_10_trials_prunes_and_its_study_loads(
    tmp_path: Path, e2e_model: Path, chat_data: Path, workers: list
) -> None:
    config = sweep_config(tmp_path, e2e_model, chat_data, steps=4, eval_every=1, warmup=0)
    started = run_cli(
        "sweep", str(config), "train.lr=tag(log,interval(1e-6,0.3))", "method.rank=2,4",
        "--search", "optuna", "--trials", str(TRIALS), "--metric", "val_loss", "--json", timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    queued = json.loads(started.stdout)
    assert len(queued["results"]) == TRIALS and all(r["params"] == {} for r in queued["results"])  # picked at start
    two_workers(tmp_path, workers)

    sweep = json.loads(run_cli("sweep", "show", queued["id"], "--json", timeout=120).stdout)
    results = sweep["results"]
    states = [r["status"] for r in results]
    assert set(states) <= {"completed", "pruned"} and states.count("pruned") >= 1, states
    assert sorted(r["trial"] for r in results) == list(range(TRIALS))
    for r in results:
        assert r["config"]["train"]["lr"] == pytest.approx(r["params"]["train.lr"])
        assert 1e-6 <= r["params"]["train.lr"] <= 0.3 and r["params"]["method.rank"] in (2, 4)
    pruned = [r for r in results if r["status"] == "pruned"]
    assert all(len([k for k in r["metrics"] if k == "val_loss"]) == 1 for r in pruned)

    study = optuna.load_study(study_name=sweep["study"], storage=sweep["storage"])
    by_number = {t.number: t for t in study.trials}
    assert len(by_number) == TRIALS
    for r in results:
        trial = by_number[r["trial"]]
        assert trial.params["train.lr"] == pytest.approx(r["params"]["train.lr"])
        if r["status"] == "pruned":
            assert trial.state == optuna.trial.TrialState.PRUNED and trial.last_step < 4
        else:
            assert trial.state == optuna.trial.TrialState.COMPLETE and trial.value == pytest.approx(r["value"])
    assert study.best_trial.number == sweep["best"]["trial"]
