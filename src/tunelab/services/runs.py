"""Runs: start, resume, list and show; a run is recorded before any heavy work starts.

So even a crash while loading the model leaves a ``failed`` run with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from tunelab.config.load import load_config, validate_config
from tunelab.config.schema import RunConfig
from tunelab.data.prepare import PreparedData
from tunelab.distributed.group import Group, join, rank_from_env, shared
from tunelab.distributed.launch import launch
from tunelab.errors import StateError, TunelabError
from tunelab.jobs.events import EventCallback
from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services import run_health
from tunelab.services.run_records import RegistryCallback
from tunelab.services.tracking import run_trackers
from tunelab.services.views import RunView
from tunelab.settings import get_settings
from tunelab.train import recipe
from tunelab.train.callbacks import CallbackList, MetricsFile
from tunelab.train.loop import LoopResult
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
    on_recorded: Callable[[str, Path], None] | None = None,
) -> RunOutcome:
    """Record a new run and train it to the end (or until ``should_stop``).

    Under torchrun every rank calls this; rank 0 records the run and tells the others its id.
    ``on_recorded(run_id, output_dir)`` is called as soon as the run is in the registry, before
    loading or tokenizing (minutes on a big model), so a user can find the run while it starts.
    """
    run_id, output_dir = shared(join(), lambda: _record_new(cfg, run_id))
    if on_recorded is not None:
        on_recorded(run_id, output_dir)
    return _execute(run_id, cfg, output_dir, resume=False, callbacks=callbacks, should_stop=should_stop)


def _record_new(cfg: RunConfig, run_id: str | None) -> tuple[str, Path]:
    engine = open_registry()
    run_id = run_id or repo.new_run_id()
    output_dir = Path(cfg.output_dir).expanduser() if cfg.output_dir else get_settings().runs_dir / run_id
    recipe.check_fresh_output(output_dir, cfg)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False), encoding="utf-8")
    with session_scope(engine) as s:
        repo.create_run(s, run_id=run_id, config=cfg.to_dict(), output_dir=str(output_dir), name=cfg.name)
    return run_id, output_dir


def resume_run(
    run_text: str,
    *,
    callbacks: Sequence[Any] = (),
    should_stop: Callable[[], bool] = lambda: False,
    on_recorded: Callable[[str, Path], None] | None = None,
) -> RunOutcome:
    """Continue a run from its newest checkpoint (from the start if it never wrote one).

    The number of processes may differ from the run's start (the checkpoint keeps the global batch).
    ``on_recorded`` as for :func:`start_run`, once the run is found.
    """
    run_id, config, output_dir = shared(join(), lambda: _stored_run(run_text))
    if on_recorded is not None:
        on_recorded(run_id, output_dir)
    cfg = validate_config(config)
    return _execute(run_id, cfg, output_dir, resume=True, callbacks=callbacks, should_stop=should_stop)


def _stored_run(run_text: str) -> tuple[str, dict, Path]:
    run_health.fail_orphaned_runs()
    with session_scope(open_registry()) as s:
        run_id = repo.resolve_run_id(s, run_text)
        row = repo.get_run(s, run_id)
        config, output_dir, status = dict(row.config), Path(row.output_dir), row.status
        owner = (row.owner_pid, row.owner_host) if status == "running" else (None, None)
    if status == "completed":
        raise StateError(f"run {run_id} already completed; its result is in {output_dir}")
    run_health.refuse_if_training(run_id, *owner)
    return run_id, config, output_dir


def launch_run(nproc: int, config: Path | None, overrides: Sequence[str], resume: str | None) -> int:
    """Run ``tunelab train`` as ``nproc`` processes here (mlx.launch for backend: mlx, else torchrun).

    A bad config fails here, once, not in every process.  Returns their exit code.
    """
    backend: str
    if config is not None:
        backend = load_config(config, list(overrides)).backend
        args = ["train", str(config), *overrides]
    else:
        run = show_run(resume or "")
        backend = run.backend or run.config.get("backend", "auto")  # the one it trained on
        args = ["train", "--resume", resume or ""]
    return launch(nproc, args, backend=backend)


def is_main_process() -> bool:
    """False in every process of a multi-process run but rank 0 (which alone shows progress)."""
    return rank_from_env() == 0


def _execute(
    run_id: str,
    cfg: RunConfig,
    output_dir: Path,
    *,
    resume: bool,
    callbacks: Sequence[Any],
    should_stop: Callable[[], bool],
) -> RunOutcome:
    group = join()
    if group.world > 1:
        # Every rank must stop at the same step, so one Ctrl-C anywhere stops them all.
        should_stop = _any_rank(group, should_stop)
        if group.rank != 0:
            own = [c for c in callbacks if getattr(c, "every_rank", False)]
            return _execute_follower(
                run_id, cfg, output_dir, resume=resume, group=group, callbacks=own, should_stop=should_stop
            )
    with session_scope(open_registry()) as s:
        repo.update_run(
            s,
            run_id,
            status="running",
            started_at=datetime.now(timezone.utc),
            error=None,
            finished_at=None,
            **run_health.owner(),  # so a run whose process dies without a word is marked failed later
        )
    try:
        prep = recipe.setup(cfg, output_dir, resume=resume, on_data=lambda d: _record_data(run_id, d), group=group)
        _record_loaded(run_id, prep)
        hooks = _hooks(run_id, cfg, output_dir, prep, callbacks)
        result = recipe.train(prep, output_dir, hooks, should_stop)
    except BaseException as exc:
        _finish(run_id, "failed" if not isinstance(exc, KeyboardInterrupt) else "cancelled", error=_reason(exc))
        raise
    status = "completed" if result.status == "completed" else "cancelled"
    final = recipe.result_dir(output_dir, cfg.method.name) if status == "completed" else None
    metrics = _record_result(run_id, cfg, output_dir, prep, result, final, hooks)
    hooks.on_end(step=result.state.step, status=status)
    _finish(run_id, status, final_metrics=metrics)
    group.barrier()  # the others wait for the result to be saved and recorded, so all ranks end together
    return RunOutcome(run_id, status, output_dir, final, metrics)


def _record_loaded(run_id: str, prep: recipe.Prepared) -> None:
    """What loading decided: the model, backend and device, the step count, the estimate, the settled config."""
    with session_scope(open_registry()) as s:
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
            estimated_memory_bytes=prep.memory.estimate.peak_bytes if prep.memory and prep.memory.estimate else None,
            config=prep.cfg.to_dict(),  # what it trains with (batch settled); output_dir/config.yaml is as written
        )


def _hooks(
    run_id: str, cfg: RunConfig, output_dir: Path, prep: recipe.Prepared, callbacks: Sequence[Any]
) -> CallbackList:
    """The run's callbacks (files, registry, events, the caller's), told first what setup found.

    A job's child passes its own :class:`EventCallback` (with the job's id); a run started any other way
    gets one here, so the WebSocket replays a foreground run as it does a job's.
    """
    events = [] if any(isinstance(c, EventCallback) for c in callbacks) else [EventCallback(None, run_id)]
    hooks = CallbackList(
        [
            MetricsFile(output_dir / "metrics.jsonl"),
            *([TensorBoardCallback(output_dir / "tensorboard")] if _tensorboard(cfg) else []),
            RegistryCallback(run_id),
            *events,
            *run_trackers(run_id, cfg, output_dir),
            *callbacks,
        ]
    )
    if prep.data.cache_status != "unused":  # GRPO tokenizes its prompts at start, without the cache
        hooks.on_message(f"tokenization cache {prep.data.cache_status}" + _key_note(prep.data.cache_key))
    if prep.memory is not None:
        hooks.on_message(prep.memory.summary())
    for note in prep.skipped:  # a damaged checkpoint: said on the console and in the job's log
        hooks.on_message(note)
    if prep.resumed_from is not None:
        hooks.on_message(f"resuming from {prep.resumed_from.name}")
    return hooks


def _tensorboard(cfg: RunConfig) -> bool:
    return cfg.tensorboard and "tensorboard" in cfg.tracking


def _record_result(
    run_id: str,
    cfg: RunConfig,
    output_dir: Path,
    prep: recipe.Prepared,
    result: LoopResult,
    final: Path | None,
    hooks: CallbackList,
) -> dict[str, float | None]:
    """The run's final metrics, artifacts and measured peak (said when it is far from the estimate)."""
    metrics = {"train_loss": None, "val_loss": result.state.last_val_loss, "best_val_loss": result.state.best_val_loss}
    with session_scope(open_registry()) as s:
        metrics["train_loss"] = repo.latest_metrics(s, run_id).get("train_loss")
        metrics["tokens_per_sec"] = result.state.tokens_seen / max(result.state.elapsed_s, 1e-9)
        if final is not None:
            repo.add_artifact(s, run_id=run_id, kind=final.name, path=str(final))
        repo.add_artifact(s, run_id=run_id, kind="metrics", path=str(output_dir / "metrics.jsonl"))
        if _tensorboard(cfg):
            repo.add_artifact(s, run_id=run_id, kind="tensorboard", path=str(output_dir / "tensorboard"))
        peak = prep.backend.peak_memory_bytes()
        repo.update_run(s, run_id, peak_memory_bytes=peak, step=result.state.step)
    off = prep.memory.measured(peak) if prep.memory is not None else None
    if off is not None:
        hooks.on_message(off)
    return metrics


def _any_rank(group: Group, should_stop: Callable[[], bool]) -> Callable[[], bool]:
    return lambda: group.any(should_stop())


def _execute_follower(
    run_id: str,
    cfg: RunConfig,
    output_dir: Path,
    *,
    resume: bool,
    group: Group,
    callbacks: Sequence[Any],
    should_stop: Callable[[], bool],
) -> RunOutcome:
    """A rank other than 0: the same setup and loop, but no registry, files or progress of its own
    (``callbacks`` are only those that control this process)."""
    prep = recipe.setup(cfg, output_dir, resume=resume, on_data=lambda _d: None, group=group)
    result = recipe.train(prep, output_dir, CallbackList(list(callbacks)), should_stop)
    status = "completed" if result.status == "completed" else "cancelled"
    final = recipe.result_dir(output_dir, cfg.method.name) if status == "completed" else None
    metrics = {"val_loss": result.state.last_val_loss, "best_val_loss": result.state.best_val_loss}
    group.barrier()  # rank 0 is saving and recording the result
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


def list_runs(*, status: str | None = None, limit: int = 200) -> list[RunView]:
    """The newest runs, newest first (each the same view as `runs show`)."""
    run_health.fail_orphaned_runs()
    with session_scope(open_registry()) as s:
        return [_view(repo.run_summary(s, row.id)) for row in repo.list_runs(s, status=status, limit=limit)]


def show_run(run_text: str) -> RunView:
    """One run, found by id or unique id prefix."""
    run_health.fail_orphaned_runs()
    with session_scope(open_registry()) as s:
        return _view(repo.run_summary(s, repo.resolve_run_id(s, run_text)))


def _view(summary: dict[str, Any]) -> RunView:
    return RunView(**summary, missing=run_health.missing_files(summary))
