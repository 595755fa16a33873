"""Use case: `tunelab eval` as a queued job — submitted from the CLI or the API, run by a `tunelab worker`.

An eval job is a row of the same job queue training uses (kind ``eval``), linked to the run it scores;
its request (data, metrics, base, limit, answer length) is the job's ``config``.  Everything a user can
get wrong is checked when it is queued, so a bad request is refused at once rather than failing on a
worker.  The results land where `tunelab eval` puts them (the run's metrics and ``eval`` artifact), and
:func:`eval_page` reads them back a page of examples at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, StateError
from tunelab.evaluate.metrics import DEFAULT, resolve
from tunelab.registry.db import open_registry, session_scope
from tunelab.services.evals import eval_run, run_examples, split_metrics
from tunelab.services.runs import show_run
from tunelab.services.views import JobView


class _Stopped(Exception):
    """The worker asked the job to stop (a cancel, or the worker shutting down): nothing is recorded."""


def eval_request(
    run_text: str,
    *,
    data: str | None = None,
    metrics: Sequence[str] = DEFAULT,
    base: bool = True,
    limit: int | None = None,
    max_new_tokens: int = 128,
    allowed_roots: Sequence[Path] | None = None,
) -> dict[str, Any]:
    """The checked request an eval job carries: the run exists and is finished, the metrics and data are usable.

    Over the API (``allowed_roots`` given) the data must lie inside those folders, and only built-in metrics
    are accepted: a ``module:function`` would import and call server-side code named by the client.
    """
    names, generative = split_metrics(metrics)
    if allowed_roots is not None and any(":" in n for n in generative):
        raise ConfigError("metrics: your own module:function metrics run only from the CLI, not over the API",
                          hint="use the built-in metrics here, or run tunelab eval RUN_ID on the server")  # fmt: skip
    if not names or generative:
        resolve(generative)  # unknown names and unimportable functions, before anything is queued
    run = show_run(run_text)
    if run.status != "completed":
        raise StateError(f"run {run.id} is {run.status}: only a finished run can be evaluated",
                         hint="wait for it to complete (tunelab runs show RUN_ID)")  # fmt: skip
    if data is not None and allowed_roots is not None:
        from tunelab.security.paths import anchor, check_path

        data = anchor(data, allowed_roots, "data")
        check_path(data, "data", allowed_roots)
    if generative:
        run_examples(run, data, limit=1)  # a missing file or a wrong format, now
    return {"run": run.id, "data": data, "metrics": names, "base": base, "limit": limit,
            "max_new_tokens": max_new_tokens}  # fmt: skip


def submit_eval(
    run_text: str,
    *,
    data: str | None = None,
    metrics: Sequence[str] = DEFAULT,
    base: bool = True,
    limit: int | None = None,
    max_new_tokens: int = 128,
    priority: int = 0,
    allowed_roots: Sequence[Path] | None = None,
) -> JobView:
    """Queue an eval of a finished run for a worker; the job carries the run's id, the request its config."""
    from tunelab.registry import jobs_repo

    request = eval_request(run_text, data=data, metrics=metrics, base=base, limit=limit,
                           max_new_tokens=max_new_tokens, allowed_roots=allowed_roots)  # fmt: skip
    with session_scope(open_registry()) as s:
        job = jobs_repo.create_job(
            s, job_id=jobs_repo.new_job_id(), kind="eval", config={"eval": request}, run_id=request["run"],
            priority=priority, allowed_roots=[str(r) for r in allowed_roots] if allowed_roots is not None else None,
        )  # fmt: skip
        jobs_repo.add_event(s, type="status", data={"status": "queued"}, job_id=job.id)
        return JobView(**jobs_repo.job_public(job))


def run_eval_job(
    job_id: str,
    config: dict[str, Any],
    roots: Sequence[str] | None,
    *,
    log: Callable[[str], None],
    should_stop: Callable[[], bool] = lambda: False,
) -> str:
    """Run a claimed eval job here (in the worker's child); returns ``completed`` or ``stopped``."""
    request = dict(config.get("eval") or {})
    if "run" not in request:
        raise ConfigError(f"job {job_id} is an eval job without an eval request")
    if roots is not None and request.get("data"):  # submitted over the API: the file must still be inside
        from tunelab.security.paths import check_path

        check_path(str(request["data"]), "data", [Path(r) for r in roots])

    def stage(text: str) -> None:
        if should_stop():
            raise _Stopped
        log(text)

    try:
        report = eval_run(
            str(request["run"]), data=request.get("data"), metrics=request.get("metrics") or DEFAULT,
            base=bool(request.get("base", True)), limit=request.get("limit"),
            max_new_tokens=int(request.get("max_new_tokens") or 128), on_stage=stage,
        )  # fmt: skip
    except _Stopped:
        log("stopped before the eval finished: nothing recorded")
        return "stopped"
    scores = ", ".join(f"{k} {v:.4g}" for k, v in report.scores.items())
    base = (
        ""
        if report.base_scores is None
        else "; base " + ", ".join(f"{k} {v:.4g}" for k, v in report.base_scores.items())
    )
    log(f"eval of run {report.run_id} on {report.examples} examples: {scores}{base}")
    return "completed"


def eval_page(run_text: str, *, offset: int = 0, limit: int = 50) -> dict[str, Any]:
    """The run's newest eval: its scores (and the base's), and examples ``offset`` to ``offset + limit`` of ``total``.

    A run never evaluated is a :class:`~tunelab.errors.NotFoundError` naming how to start one.
    """
    from tunelab.errors import NotFoundError

    run = show_run(run_text)
    evals = [a for a in run.artifact_list if a.kind == "eval"]
    if not evals:
        raise NotFoundError(f"run {run.id} has not been evaluated yet",
                            hint=f"start one: tunelab eval {run.id} (or POST /v1/runs/{run.id}/evals)")  # fmt: skip
    newest = max(evals, key=lambda a: a.created_at or "")
    meta, path = newest.meta or {}, Path(newest.path)
    examples: list[dict[str, Any]] = []
    total = 0
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            for total, line in enumerate(fh, start=1):
                if offset < total <= offset + limit:
                    examples.append(json.loads(line))
    return {
        "run_id": run.id,
        "path": newest.path,
        "data": meta.get("data"),
        "scores": meta.get("scores") or {},
        "base_scores": meta.get("base_scores"),
        "offset": offset,
        "total": total,
        "examples": examples,
        "missing": not path.is_file(),
    }
