"""Export a finished run to where people run models, verified, and record the artifact."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, StateError
from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services import run_health
from tunelab.services.export_evals import ExportFile, ExportTable, score_exports, table_request


def export_run(
    run_text: str,
    *,
    to: str,
    out: Path,
    quantize: str | None = None,
    verify: bool = True,
    force: bool = False,
    adapter_only: bool = False,
    base: str | None = None,
    imatrix: str | None = None,
) -> Any:
    """Export a finished run (``to``: hf, mlx, gguf, ollama, onnx, coreml, gguf-adapter, mlx-adapter), verify it
    and record it.

    ``adapter_only`` (with ``to="ollama"``) writes the LoRA adapter GGUF and a Modelfile whose ``FROM``
    is ``base`` (an Ollama model name or a .gguf path; default: the run's model.path when it was a
    .gguf file or an Ollama model, else the base is written beside the adapter).
    ``imatrix`` (K/i-quants): ``"auto"`` collects the importance matrix from the run's held-out examples
    with the merged model; anything else is an imatrix file from llama-imatrix.
    Returns a :class:`tunelab.export.pipeline.ExportResult`; the artifact is
    recorded as ``export:<to>`` (``export:ollama-adapter`` for adapter-only) with the
    verification report and its sha256.
    """
    to = _target(to, adapter_only=adapter_only, base=base)
    run_id, result = _write(run_text, to, out, quantize=quantize, verify=verify, force=force, base=base,
                            imatrix=imatrix)  # fmt: skip
    _record(run_id, to, result)
    return result


def export_and_evaluate(
    run_text: str,
    *,
    to: str,
    out: Path,
    quantize: str | None = None,
    verify: bool = True,
    force: bool = False,
    data: str | None = None,
    metrics: Sequence[str] = ("exact_match",),
    limit: int | None = None,
    max_new_tokens: int = 64,
    max_drop: float | None = None,
    imatrix: str | None = None,
    on_stage: Callable[[str], None] = lambda _text: None,
) -> tuple[Any, ExportTable]:
    """Export and verify as :func:`export_run`, then score the export against the run on held-out examples.

    The metric names and the examples are checked before the export is written.  The export is recorded
    (with the table in its meta) only when nothing dropped past ``max_drop``; otherwise its files are kept
    for inspection, unrecorded, and the table's ``failures`` say what dropped (the CLI exits 8).
    """
    from tunelab.evaluate.exports import SCORABLE

    if to not in SCORABLE:
        raise ConfigError(
            f"--eval scores exports loaded by a runtime here ({', '.join(SCORABLE)}), not --to {to}",
            hint="drop --eval, or export to one of those targets",
        )
    request = table_request(run_text, data=data, metrics=metrics, limit=limit, max_new_tokens=max_new_tokens,
                            max_drop=max_drop)  # fmt: skip
    run_id, result = _write(request.run.id, to, out, quantize=quantize, verify=verify, force=force, base=None,
                            imatrix=imatrix)  # fmt: skip
    on_stage(f"scoring the {to} export against run {run_id} on {len(request.examples)} held-out examples")
    table = score_exports(request, [ExportFile(to, str(result.path), result.precision)], on_stage=on_stage)
    if not table.failures:
        _record(run_id, to, result, eval=table.to_dict())
    return result, table


def _require_runtime(to: str, quantize: str | None, verify: bool) -> None:
    """A target whose writer or checker is not installed is refused before any work, with the command that adds it."""
    from tunelab.export.pipeline import missing_runtime
    from tunelab.services.system import extras

    missing, skippable = missing_runtime(to, quantize, verify)
    if not missing:
        return
    extra = "gguf" if "llama-cpp-python" in missing or "gguf" in missing else "export"
    command = next((e.command for e in extras() if e.name == extra), f'pip install "tunelab[{extra}]"')
    what = "verifying" if skippable else "writing"
    raise ConfigError(
        f"{what} --to {to} needs {', '.join(missing)}, which is not installed here",
        hint=command + (", or --no-verify to write it unchecked" if skippable else ""),
    )


def _write(
    run_text: str,
    to: str,
    out: Path,
    *,
    quantize: str | None,
    verify: bool,
    force: bool,
    base: str | None,
    imatrix: str | None = None,
) -> tuple[str, Any]:
    """Merge the run's result, write it as ``to`` and verify it: (the run's id, the ExportResult)."""
    from tunelab.export.pipeline import ExportSource, check_options, export_model
    from tunelab.hub import load_tokenizer, resolve_model_path

    check_options(to, quantize, imatrix)
    _require_runtime(to, quantize, verify)
    with session_scope(open_registry()) as s:
        run_id = repo.resolve_run_id(s, run_text)
        run = repo.run_summary(s, run_id)
    run_health.require_files(run, "export")
    artifacts = run["artifacts"]
    if run["status"] != "completed" or not (artifacts.get("adapter") or artifacts.get("model")):
        raise StateError(
            f"run {run_id} has nothing to export yet (status {run['status']})",
            hint=f"finish it first: tunelab train --resume {run_id}",
        )
    adapter = Path(artifacts["adapter"]) if artifacts.get("adapter") else None
    if adapter is not None:
        base_dir = resolve_model_path(run["config"]["model"]["path"], run["config"]["model"].get("revision"))
        tokenizer_dir = adapter if (adapter / "tokenizer_config.json").is_file() else base_dir
    else:
        base_dir = tokenizer_dir = Path(artifacts["model"])
    tokenizer = load_tokenizer(tokenizer_dir)
    template = getattr(tokenizer, "chat_template", None) or None
    from_ref = _from_ref(base, str(run["config"]["model"]["path"]))
    source = ExportSource(base_dir, adapter, tokenizer_dir, template, from_ref=from_ref)
    importance = _imatrix(imatrix, run_id, tokenizer)
    return run_id, export_model(source, to, out, quantize=quantize, check=verify, force=force, imatrix=importance)


def _imatrix(spec: str | None, run_id: str, tokenizer: Any) -> Any:
    """``--imatrix``: None, a file (checked now), or ``auto``: the run's held-out examples tokenized as
    ``tunelab generate`` and the export table do (prompt, then the reference answer)."""
    from tunelab.evaluate.exports import prompted
    from tunelab.export.imatrix import calibration_from
    from tunelab.services.evals import run_examples
    from tunelab.services.runs import show_run
    from tunelab.vocab import CHAT_FORMATS

    if spec is None:
        return None
    if spec != "auto":
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"--imatrix {spec}: no such file", hint="give an imatrix file, or --imatrix auto")
        return path
    run = show_run(run_id)
    try:
        where, examples = run_examples(run, None, None)
    except ConfigError:
        raise ConfigError(
            f"--imatrix auto collects the importance matrix from the held-out examples of run {run_id}, "
            "and it has no validation file",
            hint="give --imatrix FILE (from llama-imatrix), or train with data.valid",
        ) from None
    pieces = prompted(examples, tokenizer, chat=run.trained_format in CHAT_FORMATS)
    return calibration_from([p.prompt + p.answer for p in pieces], Path(where).name)


def _record(run_id: str, to: str, result: Any, **extra: Any) -> None:
    """The export as an ``export:<to>`` artifact of the run, with its sha256, precision and verification report."""
    meta = {"sha256": result.sha256, "precision": result.precision, "report": result.report, "notes": result.notes}
    with session_scope(open_registry()) as s:
        repo.add_artifact(s, run_id=run_id, kind=f"export:{to}", path=str(result.path), meta={**meta, **extra})


def _target(to: str, *, adapter_only: bool, base: str | None) -> str:
    """``--to ollama --adapter-only`` is the ``ollama-adapter`` target; the options only make sense so."""
    if adapter_only and to != "ollama":
        raise ConfigError(
            f"--adapter-only applies to --to ollama (got --to {to})",
            hint="for the adapter alone use --to gguf-adapter or --to mlx-adapter",
        )
    if base is not None and not adapter_only:
        raise ConfigError("--base names the FROM of an adapter-only Modelfile", hint="add --adapter-only")
    return "ollama-adapter" if adapter_only else to


def _from_ref(base: str | None, model_path: str) -> str | None:
    """An adapter-only Modelfile's FROM: ``--base``, else the run's GGUF / Ollama base; files made absolute.

    A relative path in a Modelfile is read from the Modelfile's folder, not from where the user typed it.
    """
    from tunelab.hub import is_gguf_reference

    ref = base or (model_path if is_gguf_reference(model_path) else None)
    if ref is not None and ref.endswith(".gguf") and Path(ref).expanduser().is_file():
        return str(Path(ref).expanduser().resolve())
    return ref
