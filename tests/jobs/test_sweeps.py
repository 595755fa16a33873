"""Sweeps through the real queue: a grid and an Optuna search run by two real `tunelab worker` processes.

Bad sweeps are refused whole before anything is queued; a cancelled sweep cancels its queued trials.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.conftest import run_cli
from tests.jobs.conftest import sweep_config, two_workers

from tunelab import services
from tunelab.errors import ConfigError
from tunelab.services import sweeps

CLI_TIMEOUT = 120


@pytest.mark.parametrize(
    ("items", "search", "metric", "said"),
    [
        (["train.lrr=1e-4,3e-4"], "grid", "val_loss", "train.lrr: unknown key; did you mean train.lr?"),
        (["train.lr="], "grid", "val_loss", "train.lr: the value list is empty"),
        (["method.rank=range(8,8)"], "grid", "val_loss", "method.rank: the value list is empty"),
        (["train.lr=1e-4,3e-4"], "bayes", "val_loss", "--search must be one of grid, optuna (got 'bayes')"),
        (["train.lr=interval(1e-5,1e-2)"], "grid", "val_loss", "interval() is a continuous range"),
        (["train.lr=1e-4,30"], "grid", "val_loss", "train.lr: must be > 0 and <= 10.0 (got 30)"),
        (["train.lr=1e-4,3e-4"], "grid", "val_accuracy", "--metric val_accuracy is never reported by a run"),
        (["train.lr=1e-4,3e-4"], "grid", "val_ppl", "computed on the validation set, and these runs have none"),
    ],
)
def test_bad_sweeps_are_refused_before_anything_is_queued(
    tmp_path: Path, e2e_model: Path, items: list[str], search: str, metric: str, said: str
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text('{"text": "hello there"}\n' * 8, encoding="utf-8")  # no validation set
    config = sweep_config(tmp_path, e2e_model, data)
    trials = 4 if search == "optuna" else None
    with pytest.raises(ConfigError) as info:
        sweeps.start_sweep(config, items, search=search, trials=trials, metric=metric)
    assert said in str(info.value)
    assert services.list_jobs() == [] and sweeps.list_sweeps() == []


def test_cancelling_a_sweep_cancels_its_queued_trials(tmp_path: Path, e2e_model: Path, chat_data: Path) -> None:
    config = sweep_config(tmp_path, e2e_model, chat_data)
    started = run_cli("sweep", str(config), "train.lr=1e-4,3e-4,1e-3", "method.rank=2,4", "--json", timeout=CLI_TIMEOUT)
    assert started.returncode == 0, started.stderr
    sweep = json.loads(started.stdout)
    assert len(sweep["results"]) == 6 and {r["status"] for r in sweep["results"]} == {"queued"}
    cancelled = run_cli("sweep", "cancel", sweep["id"][:5], "--json", timeout=CLI_TIMEOUT)
    assert cancelled.returncode == 0, cancelled.stderr
    assert {r["status"] for r in json.loads(cancelled.stdout)["results"]} == {"cancelled"}
    assert {j["status"] for j in services.list_jobs()} == {"cancelled"}
    unknown = run_cli("sweep", str(config), "train.lrr=1e-4,3e-4", timeout=CLI_TIMEOUT)
    assert unknown.returncode != 0 and "Traceback" not in unknown.stderr and "did you mean train.lr" in unknown.stderr


@pytest.mark.slow
def test_a_four_trial_grid_runs_through_two_workers(
    tmp_path: Path, e2e_model: Path, chat_data: Path, workers: list
) -> None:
    config = sweep_config(tmp_path, e2e_model, chat_data)
    started = run_cli(
        "sweep", str(config), "train.lr=1e-4,3e-2", "method.rank=2,4", "--name", "grid", "--json", timeout=CLI_TIMEOUT
    )
    assert started.returncode == 0, started.stderr
    sweep_id = json.loads(started.stdout)["id"]
    two_workers(tmp_path, workers)

    shown = run_cli("sweep", "show", sweep_id, "--json", timeout=CLI_TIMEOUT)
    assert shown.returncode == 0, shown.stderr
    sweep = json.loads(shown.stdout)
    results = sweep["results"]
    assert sweep["status"] == "completed" and len(results) == 4
    assert {(r["params"]["train.lr"], r["params"]["method.rank"]) for r in results} == {
        (lr, rank) for lr in (1e-4, 3e-2) for rank in (2, 4)
    }
    for r in results:
        assert r["status"] == "completed", r
        assert r["config"]["train"]["lr"] == r["params"]["train.lr"]
        assert r["config"]["method"]["rank"] == r["params"]["method.rank"]
        assert r["value"] == r["metrics"]["val_loss"] is not None
    values = [r["value"] for r in results]
    assert values == sorted(values) and [r["rank"] for r in results] == [1, 2, 3, 4]
    assert sweep["best"]["run_id"] == min(results, key=lambda r: r["value"])["run_id"]

    runs = {r["id"]: r for r in json.loads(run_cli("runs", "list", "--json", timeout=CLI_TIMEOUT).stdout)}
    assert {r["run_id"] for r in results} <= set(runs)
    assert all(runs[r["run_id"]]["status"] == "completed" for r in results)
    jobs = services.list_jobs()
    assert len({j["worker_id"] for j in jobs}) == 2, "both workers ran trials"
