"""Experiment trackers as train callbacks: W&B and MLflow, each through its own client.

``tracking: [tensorboard, wandb, mlflow]`` in a config.  Each tracker gets the config as parameters,
every metric at its step, and at the end the config, ``metrics.jsonl`` and the adapter as artifacts; a
sweep's trials share a group (W&B ``group``, an MLflow tag).  Settings come from each client's own
environment: ``WANDB_MODE=offline`` / ``WANDB_PROJECT`` / ``WANDB_API_KEY``, ``MLFLOW_TRACKING_URI``
(a database or a server; default ``sqlite:///$TUNELAB_HOME/mlflow.db``) / ``MLFLOW_EXPERIMENT_NAME``.

A tracker that fails (no server, no key, a library missing) says so once and is switched off for the
run: tracking must never stop a fine-tune.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.train.callbacks import FLUSH_EVERY_S, BaseCallback, Due


@dataclass(frozen=True)
class TrackedRun:
    """What every tracker is told about the run."""

    run_id: str
    name: str
    output_dir: Path
    params: dict[str, Any]  # the config, flattened to dotted keys
    group: str | None  # the sweep a trial belongs to
    result_dir: Path  # the adapter (or model) folder, logged when the run completes


class GuardedTracker(BaseCallback):
    """Run a tracker's hooks; its first exception is said once (``say``) and the tracker is dropped."""

    def __init__(self, name: str, tracker: BaseCallback, say: Callable[[str], None]) -> None:
        self.name, self.tracker, self.say = name, tracker, say
        self.failed = False

    def _guard(self, hook: str, *args: Any, **kwargs: Any) -> None:
        if self.failed:
            return
        try:
            getattr(self.tracker, hook)(*args, **kwargs)
        except Exception as exc:  # a tracker's failure, whatever its kind, must not end the run
            self.failed = True
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            self.say(f"warning: {self.name} tracking stopped ({first}); training goes on without it")

    def on_start(self, *, step: int, total_steps: int) -> None:
        self._guard("on_start", step=step, total_steps=total_steps)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._guard("on_metrics", step, metrics)

    def flush(self) -> None:
        self._guard("flush")

    def on_end(self, *, step: int, status: str) -> None:
        self._guard("on_end", step=step, status=status)


class WandbTracker(BaseCallback):
    """A W&B run with the tunelab run's id; ``WANDB_MODE=offline`` keeps it in ``OUTPUT_DIR/wandb``."""

    def __init__(self, run: TrackedRun) -> None:
        self.run = run
        self._wb: Any = None

    def on_start(self, *, step: int, total_steps: int) -> None:
        import wandb

        self._wb = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tunelab"),
            id=self.run.run_id,
            name=self.run.name,
            group=self.run.group,
            config=self.run.params,
            dir=str(self.run.output_dir),
            resume="allow",
            reinit="create_new",
        )

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._wb is not None:
            self._wb.log(dict(metrics), step=step)

    def on_end(self, *, step: int, status: str) -> None:
        if self._wb is None:
            return
        import wandb

        if status == "completed":
            artifact = wandb.Artifact(f"run-{self.run.run_id}", type="model")
            _add_files(self.run, artifact.add_file, artifact.add_dir)
            self._wb.log_artifact(artifact)
        self._wb.finish(exit_code=0 if status == "completed" else 1)
        self._wb = None


class MlflowTracker(BaseCallback):
    """An MLflow run: params, metrics in batches every few seconds, artifacts at the end."""

    def __init__(self, run: TrackedRun, default_uri: str, every_s: float = FLUSH_EVERY_S) -> None:
        self.run, self.default_uri = run, default_uri
        self._client: Any = None
        self._id: str | None = None
        self._pending: list[Any] = []
        self._due = Due(every_s)

    def on_start(self, *, step: int, total_steps: int) -> None:
        # Fail in seconds, not minutes, when a server is unreachable: MLflow retries with backoff by default.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=os.environ.get("MLFLOW_TRACKING_URI") or self.default_uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "tunelab")
        found = client.get_experiment_by_name(name)
        experiment = found.experiment_id if found is not None else client.create_experiment(name)
        tags = {"tunelab.run_id": self.run.run_id, **({"tunelab.sweep": self.run.group} if self.run.group else {})}
        self._id = client.create_run(experiment, run_name=self.run.name, tags=tags).info.run_id
        params = [Param(k, str(v)[:6000]) for k, v in self.run.params.items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(self._id, params=params[i : i + 100])
        self._client = client

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        if self._client is None:
            return
        from mlflow.entities import Metric

        now = _millis()
        self._pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None)
        if self._due():
            self.flush()

    def flush(self) -> None:
        if self._client is None or not self._pending:
            return
        for i in range(0, len(self._pending), 1000):
            self._client.log_batch(self._id, metrics=self._pending[i : i + 1000])
        self._pending.clear()

    def on_end(self, *, step: int, status: str) -> None:
        if self._client is None:
            return
        self.flush()
        if status == "completed":
            _add_files(
                self.run,
                lambda path: self._client.log_artifact(self._id, path),
                lambda path, name: self._client.log_artifacts(self._id, path, name),
            )
        self._client.set_terminated(self._id, "FINISHED" if status == "completed" else "KILLED")
        self._client = None


def _add_files(run: TrackedRun, add_file: Callable[..., Any], add_dir: Callable[..., Any]) -> None:
    for name in ("config.yaml", "metrics.jsonl"):
        if (run.output_dir / name).is_file():
            add_file(str(run.output_dir / name))
    if run.result_dir.is_dir():
        add_dir(str(run.result_dir), run.result_dir.name)


def _millis() -> int:
    import time

    return int(time.time() * 1000)


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}`` (trackers show parameters flat)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trackers(
    names: list[str], run: TrackedRun, *, mlflow_default_uri: str, say: Callable[[str], None] | None = None
) -> list[BaseCallback]:
    """The callbacks for ``tracking:`` (TensorBoard is built by the caller, as before), each guarded."""
    say = say or (lambda text: print(text, file=sys.stderr))
    made: list[BaseCallback] = []
    if "wandb" in names:
        made.append(GuardedTracker("wandb", WandbTracker(run), say))
    if "mlflow" in names:
        made.append(GuardedTracker("mlflow", MlflowTracker(run, mlflow_default_uri), say))
    return made
