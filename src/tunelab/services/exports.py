"""Export a finished run to where people run models, verified, and record the artifact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import StateError
from tunelab.registry import repo
from tunelab.registry.db import open_registry, session_scope
from tunelab.services import run_health


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
    run_health.require_files(run, "export")
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
