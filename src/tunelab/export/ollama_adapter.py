"""``--to ollama --adapter-only``: the LoRA adapter GGUF plus a Modelfile with ``FROM <base>`` and ``ADAPTER``.

For people who already have the base in Ollama: a few MB of adapter instead of
a merged multi-GB file.  ``FROM`` names the base as Ollama knows it (``--base``:
a model name in its store or a GGUF path; by default the run's own model.path
when that was a .gguf file or an Ollama model).  With neither, the base is
written beside the adapter as ``base.gguf`` (f16), so the folder still works
on its own.  TEMPLATE and stops are found exactly as for the merged ``ollama``
target, and verification applies the adapter to the base in llama.cpp and
renders the Modelfile's TEMPLATE.
"""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import ModelError
from tunelab.export.gguf_adapter import require_adapter
from tunelab.export.gguf_adapter import write_adapter as write_gguf_adapter
from tunelab.export.merge import Merged
from tunelab.export.ollama import match_format, modelfile, render_modelfile
from tunelab.export.pipeline import ExportSource, Written

__all__ = ["require_adapter", "write_adapter"]

ADAPTER_FILE = "adapter.gguf"
BASE_FILE = "base.gguf"


def write_adapter(source: ExportSource, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Write ``out/adapter.gguf`` and ``out/Modelfile`` (and ``out/base.gguf`` when no base is named)."""
    from tunelab.export.gguf import default_quant, write_gguf

    if merged.template is None:
        raise ModelError("the run has no chat template, so there is no Ollama TEMPLATE to write", hint="use --to gguf")
    fmt = match_format(merged.tokenizer, merged.template)
    out.mkdir(parents=True, exist_ok=True)
    inner = write_gguf_adapter(source, merged, out / ADAPTER_FILE, quantize)
    notes = list(inner.notes)
    base = source.from_ref
    if base is None:
        write_gguf(
            source.base,
            out / BASE_FILE,
            quant=default_quant(source.base),
            tokenizer=merged.tokenizer,
            template=merged.template,
        )
        base = BASE_FILE
        notes.append(f"no --base named: wrote the base as {BASE_FILE} beside the adapter (FROM ./{BASE_FILE})")
    else:
        notes.append(f"FROM {base}: it must be the base this run was trained on (tunelab can't check Ollama's copy)")
    (out / "Modelfile").write_text(modelfile(fmt, base, adapter=ADAPTER_FILE), encoding="utf-8")
    return Written(
        out,
        inner.precision,
        inner.runtime,
        render=lambda messages: render_modelfile(out / "Modelfile", messages, merged.tokenizer),
        notes=[*notes, f"Modelfile TEMPLATE: {fmt.name}"],
        cleanup=inner.cleanup,
    )
