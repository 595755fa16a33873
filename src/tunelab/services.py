"""Use cases: what the CLI, the API and the dashboard call.  Each is one function.

A run is recorded in the registry before any heavy work starts, so even a
crash while loading the model leaves a ``failed`` run with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tunelab import recipe
from tunelab.config.load import validate_config
from tunelab.config.schema import RunConfig
from tunelab.data.prepare import PreparedData
from tunelab.errors import ConfigError, StateError, TunelabError
from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.settings import get_settings
from tunelab.train.callbacks import BaseCallback, CallbackList, MetricsFile
from tunelab.train.checkpoint import list_checkpoints
from tunelab.train.tensorboard import TensorBoardCallback


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended and where its results are."""

    run_id: str
    status: str
    output_dir: Path
    result_dir: Path | None
    metrics: dict[str, float | None]


def start_run(
    cfg: RunConfig,
    *,
    callbacks: Sequence[Any] = (),
    should_stop: Callable[[], bool] = lambda: False,
    run_id: str | None = None,
) -> RunOutcome:
    """Record a new run and train it to the end (or until ``should_stop``)."""
    engine = open_registry()
    run_id = run_id or repo.new_run_id()
    output_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else get_settings().runs_dir / run_id
    recipe.check_fresh_output(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    with session_scope(engine) as s:
        repo.create_run(s, run_id=run_id, config=cfg.to_dict(), output_dir=str(output_dir), name=cfg.name)
    return _execute(run_id, cfg, output_dir, resume=False, callbacks=callbacks, should_stop=should_stop)


def resume_run(
    run_text: str, *, callbacks: Sequence[Any] = (), should_stop: Callable[[], bool] = lambda: False
) -> RunOutcome:
    """Continue a run from its newest checkpoint (from the start if it never wrote one)."""
    engine = open_registry()
    with session_scope(engine) as s:
        run_id = repo.resolve_run_id(s, run_text)
        row = repo.get_run(s, run_id)
        config, output_dir, status = dict(row.config), Path(row.output_dir), row.status
    if status == "completed":
        raise StateError(f"run {run_id} already completed; its result is in {output_dir}")
    cfg = validate_config(config)
    return _execute(run_id, cfg, output_dir, resume=True, callbacks=callbacks, should_stop=should_stop)


def _execute(
    run_id: str,
    cfg: RunConfig,
    output_dir: Path,
    *,
    resume: bool,
    callbacks: Sequence[Any],
    should_stop: Callable[[], bool],
) -> RunOutcome:
    engine = open_registry()
    with session_scope(engine) as s:
        repo.update_run(
            s, run_id, status="running", started_at=datetime.now(timezone.utc), error=None, finished_at=None
        )
    try:
        prep = recipe.setup(cfg, output_dir, resume=resume, on_data=lambda d: _record_data(run_id, d))
        with session_scope(engine) as s:
            model_id = repo.upsert_model(
                s, path=prep.info.path, architecture=prep.info.architecture, num_params=prep.info.num_params
            )
            repo.update_run(
                s,
                run_id,
                model_id=model_id,
                backend=prep.choice.name,
                backend_reason=prep.choice.reason,
                device=prep.info.device,
                total_steps=prep.total_steps,
                estimated_memory_bytes=prep.memory.estimate.total if prep.memory and prep.memory.estimate else None,
            )
        hooks = CallbackList(
            [
                MetricsFile(output_dir / "metrics.jsonl"),
                *([TensorBoardCallback(output_dir / "tensorboard")] if cfg.tensorboard else []),
                RegistryCallback(run_id),
                *callbacks,
            ]
        )
        hooks.on_message(f"tokenization cache {prep.data.cache_status}" + _key_note(prep.data.cache_key))
        if prep.memory is not None:
            hooks.on_message(prep.memory.summary())
        if prep.resumed_from is not None:
            hooks.on_message(f"resuming from {prep.resumed_from.name}")
        result = recipe.train(cfg, prep, output_dir, hooks, should_stop)
    except BaseException as exc:
        _finish(run_id, "failed" if not isinstance(exc, KeyboardInterrupt) else "cancelled", error=_reason(exc))
        raise
    status = "completed" if result.status == "completed" else "cancelled"
    final = recipe.result_dir(output_dir, cfg.method.name) if status == "completed" else None
    metrics = {"train_loss": None, "val_loss": result.state.last_val_loss, "best_val_loss": result.state.best_val_loss}
    with session_scope(engine) as s:
        latest = repo.latest_metrics(s, run_id)
        metrics["train_loss"] = latest.get("train_loss")
        metrics["tokens_per_sec"] = result.state.tokens_seen / max(result.state.elapsed_s, 1e-9)
        if final is not None:
            repo.add_artifact(s, run_id=run_id, kind=final.name, path=str(final))
        repo.add_artifact(s, run_id=run_id, kind="metrics", path=str(output_dir / "metrics.jsonl"))
        if cfg.tensorboard:
            repo.add_artifact(s, run_id=run_id, kind="tensorboard", path=str(output_dir / "tensorboard"))
        repo.update_run(s, run_id, peak_memory_bytes=prep.backend.peak_memory_bytes(), step=result.state.step)
    hooks.on_end(step=result.state.step, status=status)
    _finish(run_id, status, final_metrics=metrics)
    return RunOutcome(run_id, status, output_dir, final, metrics)


def _record_data(run_id: str, data: PreparedData) -> None:
    """Record the dataset a run trains on: hash, format, counts, tokenization cache key and length stats."""
    with session_scope(open_registry()) as s:
        dataset_id = repo.upsert_dataset(
            s,
            path=data.train_path,
            content_hash=data.content_hash,
            format=data.format,
            num_train=len(data.train),
            num_valid=len(data.valid) if data.valid else 0,
            cache_key=data.cache_key,
            stats={**data.stats, "valid_path": data.valid_path},
        )
        repo.update_run(s, run_id, dataset_id=dataset_id, chat_template=data.template_name)


def _key_note(key: str | None) -> str:
    return f" ({key})" if key else " (data.cache is off)"


def _finish(run_id: str, status: str, *, error: str | None = None, final_metrics: dict | None = None) -> None:
    fields: dict[str, Any] = {"status": status, "finished_at": datetime.now(timezone.utc), "error": error}
    if final_metrics is not None:
        fields["final_metrics"] = final_metrics
    with session_scope(open_registry()) as s:
        repo.update_run(s, run_id, **fields)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return str(exc) if isinstance(exc, TunelabError) else f"{type(exc).__name__}: {exc}"


class RegistryCallback(BaseCallback):
    """Mirror metrics and checkpoints into the registry as they happen."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self._last_write = 0.0

    def on_start(self, *, step: int, total_steps: int) -> None:
        with session_scope(open_registry()) as s:
            repo.delete_metrics_after(s, run_id=self.run_id, step=step)
            repo.update_run(s, self.run_id, step=step, total_steps=total_steps)

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        with session_scope(open_registry()) as s:
            repo.add_metrics(s, run_id=self.run_id, step=step, values=metrics)
            repo.update_run(s, self.run_id, step=step)

    def on_checkpoint(self, step: int, path: Path) -> None:
        with session_scope(open_registry()) as s:
            live = {str(p) for p in list_checkpoints(path.parent)}
            for row in repo.list_artifacts(s, self.run_id):
                if row.kind == "checkpoint" and row.path not in live:
                    repo.remove_artifact(s, run_id=self.run_id, kind="checkpoint", path=row.path)
            repo.add_artifact(s, run_id=self.run_id, kind="checkpoint", path=str(path), meta={"step": step})


def list_runs(*, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """Summaries of the newest runs (the same JSON as `runs show`)."""
    with session_scope(open_registry()) as s:
        return [repo.run_summary(s, row.id) for row in repo.list_runs(s, status=status, limit=limit)]


def show_run(run_text: str) -> dict[str, Any]:
    """One run's public JSON, found by id or unique id prefix."""
    with session_scope(open_registry()) as s:
        return repo.run_summary(s, repo.resolve_run_id(s, run_text))


def export_run(
    run_text: str,
    *,
    to: str,
    out: Path,
    quantize: str | None = None,
    verify: bool = True,
    force: bool = False,
) -> Any:
    """Export a finished run (``to``: hf, mlx, gguf, ollama, onnx, coreml), verify it and record it.

    Returns a :class:`tunelab.export.pipeline.ExportResult`; the artifact is
    recorded as ``export:<to>`` with the verification report and its sha256.
    """
    from tunelab.export.pipeline import ExportSource, check_options, export_model
    from tunelab.hub import load_tokenizer, resolve_model_path

    check_options(to, quantize)
    with session_scope(open_registry()) as s:
        run_id = repo.resolve_run_id(s, run_text)
        run = repo.run_summary(s, run_id)
    artifacts = run["artifacts"]
    if run["status"] != "completed" or not (artifacts.get("adapter") or artifacts.get("model")):
        raise StateError(
            f"run {run_id} has nothing to export yet (status {run['status']})",
            hint=f"finish it first: tunelab train --resume {run_id}",
        )
    adapter = Path(artifacts["adapter"]) if artifacts.get("adapter") else None
    if adapter is not None:
        base = resolve_model_path(run["config"]["model"]["path"], run["config"]["model"].get("revision"))
        tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base
    else:
        base = tokenizer_dir = Path(artifacts["model"])
    template = getattr(load_tokenizer(tokenizer_dir), "chat_template", None) or None
    result = export_model(
        ExportSource(base, adapter, tokenizer_dir, template), to, out, quantize=quantize, check=verify, force=force
    )
    meta = {"sha256": result.sha256, "precision": result.precision, "report": result.report, "notes": result.notes}
    with session_scope(open_registry()) as s:
        repo.add_artifact(s, run_id=run_id, kind=f"export:{to}", path=str(result.path), meta=meta)
    return result


# --------------------------------------------------------------------------- jobs


def submit_job(
    cfg: RunConfig, *, kind: str = "train", priority: int = 0, allowed_roots: Sequence[Path] | None = None
) -> dict[str, Any]:
    """Queue ``cfg`` for a worker; a train job gets its (queued) run at once, so its id is known.

    ``allowed_roots`` (the API passes them) confines every path in the config to those folders.
    """
    from tunelab.registry import jobs_repo
    from tunelab.registry.tables import JOB_KINDS
    from tunelab.security.paths import check_config_paths

    if kind not in JOB_KINDS:
        raise ConfigError(f"job kind must be one of {', '.join(JOB_KINDS)} (got {kind!r})")
    if allowed_roots is not None:
        check_config_paths(cfg, allowed_roots)
    run_id = None
    with session_scope(open_registry()) as s:
        if kind == "train":
            run_id = repo.new_run_id()
            output_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else get_settings().runs_dir / run_id
            recipe.check_fresh_output(output_dir)
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
            repo.create_run(s, run_id=run_id, config=cfg.to_dict(), output_dir=str(output_dir), name=cfg.name)
        job = jobs_repo.create_job(
            s, job_id=jobs_repo.new_job_id(), kind=kind, config=cfg.to_dict(), run_id=run_id, priority=priority
        )
        jobs_repo.add_event(s, type="status", data={"status": "queued"}, job_id=job.id, run_id=run_id)
        return jobs_repo.job_public(job)


def run_job(job_id: str, *, callbacks: Sequence[Any] = (), should_stop: Callable[[], bool] = lambda: False) -> str:
    """Do a claimed job's work in this process; returns ``completed`` or ``stopped``.

    Training always continues from the run's newest checkpoint, so a job taken
    over from a dead worker resumes instead of starting again.
    """
    from tunelab.data.validate import validate_dataset
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        job = jobs_repo.get_job(s, job_id)
        kind, run_id, config = job.kind, job.run_id, dict(job.config)
        trained = run_id is not None and repo.get_run(s, run_id).status == "completed"
    if kind == "validate" or run_id is None:
        cfg = validate_config(config)
        report = validate_dataset(
            cfg.data.train, valid=cfg.data.valid, fmt=cfg.data.format, max_seq_len=cfg.data.max_seq_len
        )
        counts = ", ".join(f"{k}: {v['records']} records" for k, v in report["splits"].items())
        record_job_event(job_id, None, "log", {"text": f"ok: format {report['format']}; {counts}"})
        return "completed"
    if trained:
        return "completed"  # its worker died after training but before recording the job's end
    outcome = resume_run(run_id, callbacks=callbacks, should_stop=should_stop)
    return "completed" if outcome.status == "completed" else "stopped"


def record_job_event(job_id: str | None, run_id: str | None, type: str, data: dict[str, Any]) -> None:
    """Append a metric | log | status event for a job and/or run."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        jobs_repo.add_event(s, type=type, data=data, job_id=job_id, run_id=run_id)


def list_jobs(*, status: str | None = None, limit: int = 200) -> list[dict[str, Any]]:
    """The newest jobs as public JSON."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        return [jobs_repo.job_public(row) for row in jobs_repo.list_jobs(s, status=status, limit=limit)]


def show_job(job_text: str) -> dict[str, Any]:
    """One job, by id or unique prefix."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        return jobs_repo.job_public(jobs_repo.get_job(s, jobs_repo.resolve_job_id(s, job_text)))


def cancel_job(job_text: str) -> dict[str, Any]:
    """Cancel a queued job, or ask the worker of a running one to checkpoint and stop."""
    from tunelab.jobs import queue

    return queue.cancel(job_text)


def job_events(job_text: str, *, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """A job's events (status changes, logs, metrics) with ``id > after``."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        job_id = jobs_repo.resolve_job_id(s, job_text)
        return jobs_repo.events_after(s, job_id=job_id, after=after, limit=limit)


def run_events(run_text: str, *, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
    """A run's events with ``id > after`` (what the WebSocket sends)."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        run_id = repo.resolve_run_id(s, run_text)
        return jobs_repo.events_after(s, run_id=run_id, after=after, limit=limit)


def run_metrics(run_text: str) -> list[dict[str, Any]]:
    """Every metric point of a run as ``{step, name, value}``."""
    with session_scope(open_registry()) as s:
        return repo.metric_history(s, repo.resolve_run_id(s, run_text))


def run_status(run_id: str) -> str:
    """A run's status, cheap enough to poll; a run trained by a job isn't over until its job has recorded the end."""
    from tunelab.registry import jobs_repo

    with session_scope(open_registry()) as s:
        status = repo.get_run(s, run_id).status
        job = jobs_repo.job_for_run(s, run_id)
        if job is not None and job.status not in jobs_repo.FINAL_STATUSES:
            return job.status
        return status


# --------------------------------------------------------------------------- API: uploads and models

UPLOAD_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def upload_dataset(source: Any, *, filename: str, limit_bytes: int) -> dict[str, Any]:
    """Store an uploaded data file under ``$TUNELAB_HOME/datasets`` and validate it like `data validate`.

    The client's file name only picks the format (its suffix); the stored name
    is generated, so no path from the client is ever used as a path.  A file
    over ``limit_bytes`` or with invalid records is deleted again.
    """
    import uuid

    from tunelab.data.validate import validate_dataset
    from tunelab.errors import DataError, TooLargeError

    suffix = next((s for s in UPLOAD_SUFFIXES if filename.lower().endswith(s)), None)
    if suffix is None:
        raise DataError(f"upload a {', '.join(UPLOAD_SUFFIXES)} file (got {filename[:80]!r})")
    folder = get_settings().datasets_dir
    folder.mkdir(parents=True, exist_ok=True)
    dataset_id = uuid.uuid4().hex[:12]
    dest = folder / f"{dataset_id}{suffix}"
    try:
        with dest.open("xb") as out:
            written = 0
            while chunk := source.read(1 << 20):
                written += len(chunk)
                if written > limit_bytes:
                    raise TooLargeError(f"the file is larger than the upload limit of {limit_bytes} bytes")
                out.write(chunk)
        if written == 0:
            raise DataError("the uploaded file is empty")
        report = validate_dataset(str(dest))
    except BaseException:
        dest.unlink(missing_ok=True)
        raise
    return {
        "id": dataset_id,
        "path": str(dest),
        "format": report["format"],
        "size_bytes": written,
        "splits": report["splits"],
    }


def served_models() -> list[dict[str, Any]]:
    """Finished runs that chat completions can serve, as ``run:RUN_ID`` models."""
    out = []
    for run in list_runs(status="completed", limit=1000):
        if run["artifacts"].get("adapter") or run["artifacts"].get("model"):
            created = datetime.fromisoformat(run["finished_at"] or run["created_at"])
            out.append(
                {
                    "id": f"run:{run['id']}",
                    "created": int(created.timestamp()),
                    "base_model": run["config"]["model"]["path"],
                }
            )
    return out
