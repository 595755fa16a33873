"""The trackers a run's config asks for (``tracking:``), told the run's id, name, config and sweep."""

from __future__ import annotations

import sys
from pathlib import Path

from tunelab.config.schema import RunConfig
from tunelab.registry import jobs_repo, repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.settings import get_settings
from tunelab.train import recipe
from tunelab.train.callbacks import BaseCallback
from tunelab.train.tracking import TrackedRun, flatten, trackers


def run_trackers(run_id: str, cfg: RunConfig, output_dir: Path) -> list[BaseCallback]:
    """W&B and MLflow callbacks for the run (TensorBoard is one of the run's own files); none asked: []."""
    if not set(cfg.tracking) - {"tensorboard"}:
        return []
    with session_scope(open_registry()) as s:
        sweep = repo.get_run(s, run_id).sweep_id
    run = TrackedRun(
        run_id=run_id,
        name=cfg.name or run_id,
        output_dir=output_dir,
        params=flatten(cfg.to_dict()),
        group=sweep,
        result_dir=recipe.result_dir(output_dir, cfg.method.name),
    )

    def say(text: str) -> None:
        """A tracker's warning: on stderr (the terminal, or the worker's log) and in the run's events."""
        print(text, file=sys.stderr)
        with session_scope(open_registry()) as s:
            jobs_repo.add_event(s, type="log", data={"text": text, "level": "warning"}, run_id=run_id)

    default_uri = f"sqlite:///{get_settings().home / 'mlflow.db'}"  # MLflow 3 refuses new folder stores
    return trackers(list(cfg.tracking), run, mlflow_default_uri=default_uri, say=say)
