"""Use case: score a run (and the base it started from) on held-out examples — `tunelab eval`.

Everything a user can get wrong (the data file, a metric name, an unimportable metric) is checked
before a model loads.  The run's answers and the base's go to one per-example file in the run's
folder, written whole or not at all; the scores are stored on the run as ``eval/<metric>`` and
``eval/base/<metric>`` metrics (so `runs show --json` lists them) and the file as an ``eval``
artifact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tunelab.data.tokenize import TokenizedSplit
from tunelab.errors import ConfigError
from tunelab.evaluate.examples import load_examples
from tunelab.evaluate.metrics import DEFAULT, TOKEN_METRICS, resolve
from tunelab.evaluate.runner import EvalOutcome, answers, evaluate, score
from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services.models import generator_for_run
from tunelab.services.runs import show_run
from tunelab.services.views import RunView

DEFAULT_METRICS = DEFAULT


@dataclass(frozen=True)
class EvalReport:
    """What `tunelab eval` shows: scores for the run and (unless skipped) its base, on the same examples."""

    run_id: str
    data: str
    examples: int
    metrics: list[str]
    scores: dict[str, float]
    base_scores: dict[str, float] | None
    examples_file: str
    base_cached: bool = False  # the base's answers came from the cache (another eval on the same base and data)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "data": self.data,
            "examples": self.examples,
            "metrics": self.metrics,
            "scores": self.scores,
            "base_scores": self.base_scores,
            "examples_file": self.examples_file,
            "base_cached": self.base_cached,
        }


def eval_run(
    run_text: str,
    *,
    data: str | None = None,
    metrics: Sequence[str] = DEFAULT,
    base: bool = True,
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    backend: str | None = None,
    judge: str | None = None,
    judge_model: str | None = None,
    on_stage: Callable[[str], None] = lambda _text: None,
) -> EvalReport:
    """Generate greedy answers for the held-out examples with the run's model (and its base), and score them.

    ``batch_size`` prompts are answered at once (the answers are the same as one at a time, only sooner).
    ``perplexity`` and ``token_loss`` are measured on the same examples tokenized as training does them.
    ``judge``: an OpenAI-compatible URL whose model (``judge_model``) grades every answer 0-10 (``judge``).
    """
    names, answered = split_metrics(metrics)
    token_metrics = [n for n in names if n in TOKEN_METRICS]
    chosen = resolve(answered) if answered else []
    run = show_run(run_text)
    # Plain-text data has no answers to generate but still has a perplexity: examples only when generating.
    source, examples = run_examples(run, data, limit) if chosen else (data or _held_out(run), [])
    grader = _judge(judge, judge_model, bool(chosen), on_stage)  # reached before anything is generated
    on_stage(f"held-out examples from {source}; metrics {', '.join(names)}")
    count = len(examples)
    outcome, base_outcome, cached = EvalOutcome({}), (EvalOutcome({}) if base else None), False
    if chosen:
        tuned = generator_for_run(run.id, backend=backend)
        on_stage(f"answering with run {run.id}")
        outcome = evaluate(tuned, examples, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           on_message=on_stage)  # fmt: skip
        if base_outcome is not None:
            ask = _BaseAsk(run, bool(tuned.chat), backend, max_new_tokens, batch_size)
            base_outcome, cached = _base_outcome(ask, examples, chosen, on_stage)
    if grader is not None:
        _grade(grader, examples, [("run", outcome), ("base", base_outcome)], on_stage)
    if token_metrics:
        on_stage("measuring token loss on the examples as training tokenizes them")
        count = _add_token_metrics(run, data, limit, token_metrics, outcome, base_outcome)
    path = _write_examples(Path(run.output_dir) / "eval", outcome, base_outcome)
    _record(run.id, run.step or 0, outcome, base_outcome, path, source)
    return EvalReport(
        run.id,
        str(source),
        count,
        [m.name for m in chosen] + (["judge"] if grader is not None else []) + token_metrics,
        outcome.scores,
        base_outcome.scores if base_outcome else None,
        str(path),
        cached,
    )


def _judge(url: str | None, model: str | None, answers: bool, on_stage: Callable[[str], None]) -> Any:
    """The judge endpoint, reached now (a wrong URL fails before any model loads); None without ``url``."""
    if url is None:
        if model is not None:
            raise ConfigError("--judge-model names the model of a --judge endpoint", hint="add --judge URL")
        return None
    if not answers:
        raise ConfigError("--judge grades generated answers; perplexity and token_loss generate none",
                          hint="add a metric such as exact_match to --metrics")  # fmt: skip
    from tunelab.evaluate.judge import connect

    grader = connect(url, model)
    on_stage(f"judge: {grader.model} at {grader.base}")
    return grader


def _grade(grader: Any, examples: Sequence[Any], outcomes: Sequence[tuple[str, EvalOutcome | None]],
           on_stage: Callable[[str], None]) -> None:  # fmt: skip
    from tunelab.evaluate.judge import add_judge

    for label, outcome in outcomes:
        if outcome is None:
            continue
        on_stage(f"the judge grades the {label}'s {len(examples)} answers")
        unscored = add_judge(grader, examples, outcome)
        if unscored:
            on_stage(f"  {unscored} of the judge's replies held no 0-10 score; they are left out of its mean")


@dataclass(frozen=True)
class _BaseAsk:
    run: RunView
    chat: bool  # the base is asked in the format the run was trained on
    backend: str | None
    max_new_tokens: int
    batch_size: int  # not part of the cache key: batching never changes an answer


def _base_outcome(
    ask: _BaseAsk, examples: Sequence[Any], chosen: Sequence[Any], on_stage: Callable[[str], None]
) -> tuple[EvalOutcome, bool]:
    """The base's answers scored; generated once per base, examples and settings, then read from the cache."""
    from tunelab.evaluate import base_cache
    from tunelab.hub import resolve_model_path
    from tunelab.settings import get_settings

    folder = get_settings().home / "cache" / "eval-base"
    digest = base_cache.key(resolve_model_path(ask.run.base_model), examples, max_new_tokens=ask.max_new_tokens,
                            chat=ask.chat, backend=ask.backend or "auto")  # fmt: skip
    predictions = base_cache.load(folder, digest, len(examples))
    if predictions is not None:
        on_stage(f"the base model's answers from the cache: {base_cache.path_for(folder, digest)}")
        return score(examples, predictions, chosen), True
    untuned = generator_for_run(ask.run.id, backend=ask.backend, base=True)
    untuned.chat = ask.chat
    on_stage(f"answering with the base model {ask.run.base_model}")
    predictions = answers(untuned, examples, max_new_tokens=ask.max_new_tokens, batch_size=ask.batch_size,
                          on_message=on_stage)  # fmt: skip
    outcome = score(examples, predictions, chosen)  # before caching: a metric that raises leaves nothing behind
    base_cache.save(folder, digest, predictions, model=ask.run.base_model)
    return outcome, False


def eval_model(
    model: str,
    *,
    data: str,
    adapter: str | None = None,
    metrics: Sequence[str] = DEFAULT,
    limit: int | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    backend: str | None = None,
    judge: str | None = None,
    judge_model: str | None = None,
    on_stage: Callable[[str], None] = lambda _text: None,
) -> EvalReport:
    """Score any model folder or hub id (optionally with a PEFT ``adapter``) on ``data``: no run needed.

    The answers go to a file under ``$TUNELAB_HOME/evals``; nothing is recorded in the registry.
    ``judge``/``judge_model``: as for :func:`eval_run`.
    """
    from tunelab.inference import load_generator
    from tunelab.settings import get_settings

    names = [n.strip() for n in metrics if n.strip()]
    if any(n in TOKEN_METRICS for n in names):
        raise ConfigError("perplexity and token_loss need a run (its data settings say how to tokenize)",
                          hint="evaluate a run (tunelab eval RUN_ID), or leave them out")  # fmt: skip
    chosen = resolve(names)
    examples = load_examples(data, limit=limit)
    grader = _judge(judge, judge_model, True, on_stage)
    label = model + (f" + {adapter}" if adapter else "")
    on_stage(f"{len(examples)} examples from {data}; answering with {label}")
    generator = load_generator(model=model, adapter=adapter, backend=backend or "auto")
    outcome = evaluate(generator, examples, chosen, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       on_message=on_stage)  # fmt: skip
    if grader is not None:
        _grade(grader, examples, [("model", outcome)], on_stage)
    path = _write_examples(get_settings().home / "evals", outcome, None)
    names = [m.name for m in chosen] + (["judge"] if grader is not None else [])
    return EvalReport(label, str(data), len(examples), names, outcome.scores, None, str(path))


def split_metrics(metrics: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the metric names asked for, once each and in order; those of them scored on generated answers)."""
    names = list(dict.fromkeys(n.strip() for n in metrics if n.strip()))
    return names, [n for n in names if n not in TOKEN_METRICS]


def run_examples(run: RunView, data: str | None, limit: int | None) -> tuple[str, list[Any]]:
    """(where the examples come from, the examples): ``data`` or the run's validation file, in its data format."""
    source = data or _held_out(run)
    return source, load_examples(source, fmt=str(run.config["data"].get("format", "auto")), limit=limit)


def _held_out(run: RunView) -> str:
    """The run's validation file (data.valid, or the valid file of its data folder)."""
    from tunelab.data.sources import resolve_files

    data = run.config["data"]
    _train, valid = resolve_files(str(data["train"]), data.get("valid"))
    if valid is None:
        raise ConfigError(
            f"run {run.id} has no validation file to evaluate on",
            hint="pass the held-out examples with --data FILE",
        )
    return str(valid)


def _add_token_metrics(
    run: RunView, data: str | None, limit: int | None, names: list[str], tuned: EvalOutcome, base: EvalOutcome | None
) -> int:
    """Perplexity and token loss of the run (and its base) on the held-out examples, tokenized as in training."""
    from tunelab.config.load import load_config
    from tunelab.data.prepare import prepare_data
    from tunelab.evaluate.perplexity import token_loss
    from tunelab.hub import load_tokenizer, resolve_model_path

    cfg = load_config(run.config)
    adapter = Path(run.artifacts["adapter"]) if run.artifacts.get("adapter") else None
    tuned_dir = Path(run.artifacts["model"]) if run.artifacts.get("model") else resolve_model_path(run.base_model)
    tokenizer = load_tokenizer(adapter or tuned_dir)  # saved with the result: the template it was trained with
    if data is None:
        split = prepare_data(cfg.data, tokenizer, seed=cfg.train.seed).valid
    else:
        own = cfg.data.model_copy(update={"train": data, "valid": None, "valid_split": 0.0, "cache": False})
        split = prepare_data(own, tokenizer, seed=cfg.train.seed).train
    if split is None:
        raise ConfigError(f"run {run.id} has no validation data to measure perplexity on", hint="pass --data FILE")
    if limit is not None:
        split = TokenizedSplit(list(split.input_ids)[:limit], list(split.labels)[:limit])
    models = [(tuned, tuned_dir, adapter), (base, resolve_model_path(run.base_model), None)]
    for outcome, folder, adapter_dir in models:
        if outcome is not None:
            measured = token_loss(folder, adapter_dir, split)
            values = {"perplexity": measured.perplexity, "token_loss": measured.loss}
            outcome.scores.update({n: values[n] for n in names})
    return len(split.input_ids)


def _write_examples(folder: Path, outcome: EvalOutcome, base: EvalOutcome | None) -> Path:
    """One JSON line per example (its prompt, reference, the run's answer and the base's), written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    path = folder / f"examples-{stamp}.jsonl"
    tmp = path.with_suffix(".jsonl.tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i, row in enumerate(outcome.rows):
            line = dict(row)
            if base is not None:
                line["base_prediction"] = base.rows[i]["prediction"]
                line["base_scores"] = base.rows[i]["scores"]
                if "judge_reply" in base.rows[i]:
                    line["base_judge_reply"] = base.rows[i]["judge_reply"]
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def _record(run_id: str, step: int, outcome: EvalOutcome, base: EvalOutcome | None, path: Path, source: str) -> None:
    values = {f"eval/{name}": value for name, value in outcome.scores.items()}
    if base is not None:
        values.update({f"eval/base/{name}": value for name, value in base.scores.items()})
    meta = {"data": str(source), "scores": outcome.scores, "base_scores": base.scores if base else None}
    with session_scope(open_registry()) as s:
        repo.add_metrics(s, run_id=run_id, step=step, values=values)
        repo.add_artifact(s, run_id=run_id, kind="eval", path=str(path), meta=meta)


def harness_run(
    run_text: str,
    tasks: Sequence[str],
    *,
    task_dirs: Sequence[Path] = (),
    limit: int | None = None,
    on_stage: Callable[[str], None] = lambda _text: None,
) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness ``tasks`` (local YAML: tunelab's own and ``task_dirs``) on the run's merged model.

    An adapter run is merged into its base once, as a real HF export in the run's folder (recorded
    like any export), and reused after; the scores are stored on the run as ``harness/<task>/<metric>``.
    """
    from tunelab.evaluate.harness import check_tasks, run_harness
    from tunelab.services.exports import export_run

    check_tasks(tasks, task_dirs)  # before merging or loading anything
    run = show_run(run_text)
    model_dir = Path(run.artifacts["model"]) if run.artifacts.get("model") else Path(run.output_dir) / "eval" / "merged"
    if not (model_dir / "config.json").is_file():
        on_stage(f"merging run {run.id}'s adapter into its base for the harness (once) -> {model_dir}")
        export_run(run.id, to="hf", out=model_dir, verify=False, force=True)
    on_stage(f"running lm-evaluation-harness: {', '.join(tasks)}")
    results = run_harness(model_dir, tasks, task_dirs=task_dirs, limit=limit)
    values = {f"harness/{task}/{name}": value for task, scores in results.items() for name, value in scores.items()}
    with session_scope(open_registry()) as s:
        repo.add_metrics(s, run_id=run.id, step=run.step or 0, values=values)
    return results


def eval_results(run_text: str, *, rows: int = 200) -> dict[str, Any] | None:
    """The run's newest `tunelab eval`: its scores (and the base's) and its first ``rows`` examples; None if never."""
    run = show_run(run_text)
    evals = [a for a in run.artifact_list if a.kind == "eval"]
    if not evals:
        return None
    newest = max(evals, key=lambda a: a.created_at or "")
    meta = newest.meta or {}
    examples: list[dict[str, Any]] = []
    path = Path(newest.path)
    if path.is_file():
        with path.open(encoding="utf-8") as fh:
            examples = [json.loads(line) for _, line in zip(range(rows), fh, strict=False)]
    return {
        "path": newest.path,
        "data": meta.get("data"),
        "scores": meta.get("scores") or {},
        "base_scores": meta.get("base_scores"),
        "examples": examples,
        "missing": not path.is_file(),
    }
