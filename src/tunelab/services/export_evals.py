"""Use case: the export regression table — `tunelab eval --exports RUN` and `tunelab export … --eval`.

The run's own result (its adapter on its base, the reference) and exports of it answer the same
held-out examples, each in the runtime that serves it.  `eval --exports` compares every export
recorded on the run; `export --eval` compares the one it has just written and verified, and records
it only when no metric dropped past ``max_drop`` (a regression keeps the files, unrecorded, and
exits 8 like a failed verification).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.evaluate.metrics import Metric, resolve
from tunelab.services.evals import run_examples
from tunelab.services.runs import show_run
from tunelab.services.views import RunView


@dataclass(frozen=True)
class ExportTable:
    """The run's result and each export on the same held-out examples; ``failures``: drops past the limit."""

    run_id: str
    examples: int
    metrics: list[str]
    rows: list[dict[str, Any]]
    failures: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "examples": self.examples, "metrics": self.metrics, "rows": self.rows,
                "failures": self.failures}  # fmt: skip


@dataclass(frozen=True)
class ExportFile:
    """One export to score: its target (hf, gguf, onnx, mlx, gguf-adapter, mlx-adapter), where it is, and its
    precision (for the label)."""

    target: str
    path: str
    precision: str = ""


@dataclass(frozen=True)
class TableRequest:
    """What to score and how strictly, checked (metrics named, examples loaded) before anything slow runs."""

    run: RunView
    examples: list[Any]
    metrics: list[Metric]
    max_new_tokens: int = 64
    max_drop: float | None = None


def table_request(
    run_text: str,
    *,
    data: str | None = None,
    metrics: Sequence[str] = ("exact_match",),
    limit: int | None = None,
    max_new_tokens: int = 64,
    max_drop: float | None = None,
) -> TableRequest:
    """Resolve the run, the metric names and the held-out examples: every user mistake surfaces here."""
    chosen = resolve([m.strip() for m in metrics if m.strip()])
    run = show_run(run_text)
    _source, examples = run_examples(run, data, limit)
    return TableRequest(run, examples, chosen, max_new_tokens, max_drop)


def export_table(
    run_text: str,
    *,
    data: str | None = None,
    metrics: Sequence[str] = ("exact_match",),
    limit: int | None = None,
    max_new_tokens: int = 64,
    max_drop: float | None = None,
    on_stage: Callable[[str], None] = lambda _text: None,
) -> ExportTable:
    """Score the run (its adapter on its base, the reference) and every export recorded on it, side by side.

    With ``max_drop``, an export whose metric falls more than that below the reference's, or whose greedy
    answers differ from the reference's on more than that share of examples, is listed in ``failures``.
    """
    from tunelab.evaluate.exports import SCORABLE

    request = table_request(run_text, data=data, metrics=metrics, limit=limit, max_new_tokens=max_new_tokens,
                            max_drop=max_drop)  # fmt: skip
    run = request.run
    found = [a for a in run.artifact_list if a.kind.removeprefix("export:") in SCORABLE and Path(a.path).exists()]
    if not found:
        raise ConfigError(
            f"run {run.id} has no export to compare here ({', '.join(SCORABLE)})",
            hint=f"write one first, e.g. tunelab export {run.id} --to gguf --out model.gguf",
        )
    files = [
        ExportFile(a.kind.removeprefix("export:"), a.path, str((a.meta or {}).get("precision", ""))) for a in found
    ]
    return score_exports(request, files, on_stage=on_stage)


def score_exports(
    request: TableRequest, files: Sequence[ExportFile], *, on_stage: Callable[[str], None] = lambda _text: None
) -> ExportTable:
    """The reference's answers, then each export's, scored and compared with them: one row each."""
    from tunelab.evaluate import exports as table
    from tunelab.hub import resolve_model_path
    from tunelab.inference import stop_ids

    run, examples = request.run, request.examples
    reference, tokenizer, chat = _reference(run)
    prompts = table.prompted(examples, tokenizer, chat=chat)

    def answers(runtime: Any, target: str, path: str, ref: Any = None, ref_tokens: Any = None) -> Any:
        return table.score(runtime, target, path, prompts, examples, request.metrics,
                           lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
                           stops=stop_ids(tokenizer), max_new_tokens=request.max_new_tokens,
                           reference=ref, reference_tokens=ref_tokens)  # fmt: skip

    on_stage(f"answering {len(examples)} examples with run {run.id} (the reference)")
    ref_row, ref_tokens = answers(reference, "reference", str(run.output_dir))
    rows = [ref_row]
    adapters_only = any(f.target.endswith("-adapter") for f in files)  # applied to the base: find it only then
    base = resolve_model_path(run.base_model) if adapters_only else None
    for export in files:
        label = f"{export.target} {export.precision}".strip()  # gguf f32, gguf q4_0, gguf-adapter float16, …
        on_stage(f"answering with the {label} export {export.path}")
        with table.open_runtime(export.target, Path(export.path), base=base, base_ref=run.base_model) as runtime:
            row, _ = answers(runtime, label, export.path, ref_row, ref_tokens)
        rows.append(row)
    names = [m.name for m in request.metrics]
    failures = _drops(rows, names, request.max_drop) if request.max_drop is not None else []
    dicts = [{k: v for k, v in vars(r).items() if k != "answers"} for r in rows]
    return ExportTable(run.id, len(examples), names, dicts, failures)


def _reference(run: RunView) -> tuple[Any, Any, bool]:
    """The run's own result in float32 (the base with its adapter, unmerged), its tokenizer, and chat or not."""
    from tunelab.evaluate.perplexity import load_scoring_model
    from tunelab.export.verify import Reference
    from tunelab.hub import load_tokenizer, resolve_model_path
    from tunelab.vocab import CHAT_FORMATS

    adapter = Path(run.artifacts["adapter"]) if run.artifacts.get("adapter") else None
    folder = Path(run.artifacts["model"]) if run.artifacts.get("model") else resolve_model_path(run.base_model)
    tokenizer = load_tokenizer(adapter if adapter is not None else folder)
    model = load_scoring_model(folder, adapter)
    chat = run.trained_format in CHAT_FORMATS
    return Reference(model, tokenizer, getattr(tokenizer, "chat_template", None)), tokenizer, chat


def _drops(rows: Sequence[Any], names: Sequence[str], max_drop: float) -> list[str]:
    reference, failures = rows[0], []
    for row in rows[1:]:
        for name in names:
            drop = reference.scores[name] - row.scores[name]
            if drop > max_drop:
                failures.append(
                    f"{row.target} ({row.path}): {name} {row.scores[name]:.4g} vs {reference.scores[name]:.4g}"
                )
        if 1.0 - row.agreement > max_drop:
            failures.append(f"{row.target} ({row.path}): greedy answers agree on only {row.agreement:.0%}")
    return failures
