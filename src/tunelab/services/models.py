"""Models: generate or chat with a finished run (or a base model plus an adapter), what can be served, convert."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tunelab.errors import NotFoundError
from tunelab.services import run_health
from tunelab.services.runs import list_runs, show_run
from tunelab.services.views import RunView, ServedModel
from tunelab.vocab import CHAT_FORMATS

if TYPE_CHECKING:
    from tunelab.inference import Generator, Usage

RUN_PREFIX = "run:"


def load_generator(
    *, model: str, adapter: str | None = None, chat: bool | None = None, backend: str = "auto", device: str = "auto"
) -> Generator:
    """``model`` (a folder or hub id), plus a PEFT ``adapter``, loaded to answer prompts.

    The result has ``stream(prompt, ...)``, ``complete(prompt, ...)``, ``stream_chat(messages, usage, ...)``
    and a settable ``chat`` (apply the chat template; default: the tokenizer has one).
    """
    from tunelab.inference import load_generator as load

    return load(model=model, adapter=adapter, chat=chat, device=device, backend=backend)


def generator_for_run(
    run_text: str, *, backend: str | None = None, base: bool = False, device: str = "auto"
) -> Generator:
    """What a finished run produced (or, with ``base``, the model it started from), in its trained prompt format."""
    run = show_run(run_text)
    chat = run.trained_format in CHAT_FORMATS
    if base:  # the base answers as it would untuned: with its own template, when it has one
        return load_generator(model=run.base_model, backend=backend or "auto", device=device)
    run_health.require_files(run, "generate with")
    if run.artifacts.get("adapter"):
        return load_generator(
            model=run.base_model, adapter=run.artifacts["adapter"], chat=chat, backend=backend or "auto", device=device
        )
    if run.artifacts.get("model"):
        return load_generator(model=run.artifacts["model"], chat=chat, backend=backend or "auto", device=device)
    raise NotFoundError(
        f"run {run.id} has no adapter or model yet (status {run.status})",
        hint=f"finish it first: tunelab train --resume {run.id}",
    )


def new_usage() -> Usage:
    """A fresh counter of prompt/completion tokens and the finish reason, filled while a chat streams."""
    from tunelab.inference import Usage

    return Usage()


def stream_chat(generator: Generator, messages: list[dict[str, str]], usage: Usage, **sampling: Any) -> Iterator[str]:
    """Pieces of the answer to ``messages`` (``max_tokens``, ``temperature``, ``top_p``, ``seed``)."""
    return generator.stream_chat(messages, usage, **sampling)


def resolve_served(model: str) -> str:
    """``run:RUN_ID`` (or a unique prefix of the id) → the full run id; NotFoundError for anything else."""
    if not model.startswith(RUN_PREFIX):
        raise NotFoundError(f"model {model[:80]!r} not found: use 'run:RUN_ID' (GET /v1/models lists them)")
    return show_run(model[len(RUN_PREFIX) :]).id


def served_models() -> list[ServedModel]:
    """Finished runs that chat completions can serve, as ``run:RUN_ID`` models."""
    out = []
    for run in list_runs(status="completed", limit=1000):
        if run.artifacts.get("adapter") or run.artifacts.get("model"):
            created = datetime.fromisoformat(run.finished_at or run.created_at or "")
            out.append(
                ServedModel(id=f"{RUN_PREFIX}{run.id}", created=int(created.timestamp()), base_model=run.base_model)
            )
    return out


def lineage(*, limit: int = 1000) -> list[dict[str, Any]]:
    """Base model → dataset → run → adapter → exports, one row per run."""
    return [_lineage_row(run) for run in list_runs(limit=limit)]


def _lineage_row(run: RunView) -> dict[str, Any]:
    exports = [a.kind.split(":", 1)[1] + ": " + a.path for a in run.artifact_list if a.kind.startswith("export:")]
    return {
        "base": run.base_model,
        "dataset": run.config["data"]["train"],
        "run": run.id,
        "status": run.status,
        "adapter": run.artifacts.get("adapter") or run.artifacts.get("model") or "",
        "exports": ", ".join(exports),
    }


def convert_checkpoint(
    src: str,
    out: Path,
    *,
    to: str,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
) -> Any:
    """Convert a checkpoint to mlx-lm's layout (``to="mlx"``, optionally quantized) or back to transformers'.

    Returns a ``ConvertResult`` (``out``, ``to``, ``bits``, ``group_size``, ``dtype``, ``params``,
    ``bytes_written``, ``seconds``, ``copied``, ``notes``, ``model_type``, ``dequantized_bits``).
    """
    from tunelab.convert import convert_checkpoint as convert

    return convert(src, out, to=to, bits=bits, group_size=group_size, dtype=dtype, force=force)


def is_gguf_model(src: str) -> bool:
    """Whether ``src`` names a GGUF model: a .gguf file, or a model in the local Ollama store."""
    from tunelab.convert.gguf_in import is_gguf_source
    from tunelab.hub import is_gguf_reference

    return is_gguf_source(src) or is_gguf_reference(src)


def import_gguf(
    src: str, out: Path | None = None, *, dtype: str | None = None, verify: bool = True, force: bool = False
) -> dict[str, Any]:
    """A GGUF model (a .gguf file, or ``name[:tag]`` from the local Ollama store) as a checkpoint tunelab trains.

    With ``out``, the checkpoint is written there (as ``tunelab convert FILE.gguf --to hf``); without it,
    into tunelab's cache, where ``model.path: FILE.gguf`` finds it again (converted once).  Dequantized to
    ``dtype`` (default: the file's float type, float16 for a quantized file); tokenizer and chat template are
    carried over.  With ``verify``, the checkpoint is compared with llama.cpp running the GGUF (tokenization,
    logits within the file type's tolerance, template), and a failure raises.

    Returns ``{"gguf", "folder", "model_type", "params", "dtype", "notes", "report"}`` (``report`` is None
    unless verified).  Usable as ``model=`` for :func:`load_generator` and ``model.path`` in a config.
    """
    from tunelab.convert.gguf_in import convert_gguf
    from tunelab.errors import ModelError
    from tunelab.hub import gguf_checkpoint, gguf_file_for

    gguf_file = gguf_file_for(src) or Path(src).expanduser()
    if not gguf_file.is_file():
        raise ModelError(f"{src} is neither a .gguf file nor a model in the Ollama store", hint="check the name")
    if out is not None:
        result = convert_gguf(str(gguf_file), Path(out).expanduser(), to="hf", dtype=dtype, force=force)
        folder, info = result.out, {"model_type": result.model_type, "params": result.params, "dtype": result.dtype}
        notes = list(result.notes)
    else:
        folder = gguf_checkpoint(gguf_file)
        info, notes = _checkpoint_info(folder), []
    report = _verify_gguf(gguf_file, folder) if verify else None
    return {"gguf": gguf_file, "folder": folder, **info, "notes": notes, "report": report}


def _checkpoint_info(folder: Path) -> dict[str, Any]:
    import json

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return {"model_type": config.get("model_type"), "params": None, "dtype": config.get("dtype")}


def _verify_gguf(gguf_file: Path, folder: Path) -> dict[str, Any]:
    from tunelab.export.gguf_import import verify_conversion
    from tunelab.export.verify import raise_if_failed

    report = verify_conversion(gguf_file, folder)
    raise_if_failed(report, folder)
    return report.to_dict()
