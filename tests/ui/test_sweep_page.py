"""The dashboard's sweep page: trials ranked, a parallel-coordinates plot, the best trial, compare.

The sweep is queued by the real service; two of its trials then have the metric values a worker's
runs record (written to the registry as the trainer's registry callback writes them).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from streamlit.testing.v1 import AppTest

from tunelab.registry import jobs_repo, repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services import sweeps


def _page() -> None:
    from tunelab.ui.nav import renderer

    renderer("sweeps")()


def test_the_sweep_page_ranks_trials_and_plots_values_against_the_metric(tmp_path: Path, chat_data: Path) -> None:
    config = tmp_path / "cfg.yaml"
    raw = {"model": {"path": "org/model"}, "data": {"train": str(chat_data)}, "train": {"steps": 3}}
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    sweep = sweeps.start_sweep(config, ["train.lr=1e-4,1e-3", "method.targets=[q_proj],all-linear"], name="page")
    losses = {0: 2.5, 1: 1.5, 2: 3.0}  # trial 3 is still queued
    with session_scope(open_registry()) as s:
        for result in sweep.results:
            if result.trial in losses:
                repo.add_metrics(s, run_id=result.run_id, step=3, values={"val_loss": losses[result.trial]})
                jobs_repo.release_job(s, job_id=result.job_id, worker_id=None, status="completed")

    at = AppTest.from_function(_page, default_timeout=30)
    at.query_params["sweep"] = sweep.id
    at.run()
    assert not at.exception
    assert at.selectbox(key="sweep_pick").value == sweep.id
    assert at.metric[0].value == "queued" and at.metric[3].value == "1.5"
    table = at.dataframe[0].value
    assert list(table["rank"][:3]) == [1, 2, 3] and list(table["val_loss"][:3]) == [1.5, 2.5, 3.0]
    assert list(table["status"]) == ["completed", "completed", "completed", "queued"]
    (chart,) = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    dims = {d["label"]: d for d in chart["data"][0]["dimensions"]}
    assert list(dims) == ["train.lr", "method.targets", "val_loss"]
    assert sorted(dims["val_loss"]["values"]) == [1.5, 2.5, 3.0]
    assert dims["method.targets"]["ticktext"] == ["['q_proj']", "all-linear"]
    best = next(r for r in sweep.results if r.trial == 1)
    assert best.run_id in at.markdown[0].value
    assert len(at.multiselect(key="sweep_compare").value) == 3  # the scored trials' runs, best first
