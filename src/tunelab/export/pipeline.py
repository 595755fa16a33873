"""One export: merge → write the target → load it in its own runtime and verify.

Every target starts from the merged model.  Targets other than ``hf`` are
written from a merged HF folder staged beside the output (streamed tensor by
tensor where the target allows), which is removed afterwards.  A failed
verification keeps the files, so they can be inspected, and raises.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError
from tunelab.export.imatrix import Calibration, Imatrix
from tunelab.export.imatrix import read as read_imatrix
from tunelab.export.merge import Merged, merge_model
from tunelab.export.verify import Reference, Report, Runtime, raise_if_failed, sha256_of, verify

# Adapter targets write the run's adapter alone (for a base the user already has), not the merged model.
ADAPTER_TARGETS: tuple[str, ...] = ("gguf-adapter", "ollama-adapter", "mlx-adapter")
TARGETS: tuple[str, ...] = ("hf", "mlx", "gguf", "ollama", "onnx", "coreml", *ADAPTER_TARGETS)
# llama.cpp's K- and i-quants, written by its own quantizer (gguf_kquant's KQUANTS, IQUANTS and NEED_IMATRIX
# have the same keys); they take an importance matrix (--imatrix); the NEED_IMATRIX ones can't do without.
K_QUANTS: tuple[str, ...] = ("q2_k", "q3_k_m", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
I_QUANTS: tuple[str, ...] = (
    "iq4_xs", "iq4_nl", "iq3_m", "iq3_s", "iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s",
)  # fmt: skip
NEED_IMATRIX: tuple[str, ...] = ("iq3_xs", "iq3_xxs", "iq2_m", "iq2_s", "iq2_xs", "iq2_xxs", "iq1_m", "iq1_s")
QUANTIZE: dict[str, tuple[str, ...]] = {
    "hf": (),
    "mlx": ("4", "8"),
    "gguf": ("f32", "f16", "bf16", "q8_0", "q4_0", *K_QUANTS, *I_QUANTS),
    "ollama": ("f32", "f16", "bf16", "q8_0", "q4_0", *K_QUANTS, *I_QUANTS),
    "onnx": (),
    "coreml": ("float32", "float16"),
    "gguf-adapter": ("f32", "f16"),
    "ollama-adapter": ("f32", "f16"),
    "mlx-adapter": (),
}


@dataclass(frozen=True)
class ExportSource:
    """What a run produced: the base, its adapter (None for full runs) and the training template.

    ``from_ref`` is how Ollama names the base for an adapter-only Modelfile's ``FROM`` (a model name
    or a .gguf path); None writes the base beside the adapter.
    """

    base: Path
    adapter: Path | None
    tokenizer_dir: Path
    template: str | None
    from_ref: str | None = None


@dataclass
class Written:
    """A target's output and how to load it back for verification."""

    path: Path
    precision: str
    runtime: Callable[[], Runtime]
    render: Callable[[Sequence[dict[str, str]]], str] | None = None
    notes: list[str] = field(default_factory=list)
    cleanup: Callable[[], None] | None = None  # removes what only verification needed (e.g. a staged base GGUF)


@dataclass(frozen=True)
class ExportResult:
    """Where the export went, its hash and (unless skipped) the verification report."""

    target: str
    path: Path
    precision: str
    sha256: str
    report: dict[str, Any] | None
    notes: tuple[str, ...]
    seconds: float


def check_options(target: str, quantize: str | None, imatrix: object = None) -> None:
    """Refuse an unknown target, a quantization the target doesn't offer, or an importance matrix where no
    quantizer would read it (or its absence where llama.cpp needs one), before any loading."""
    if target not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)} (got {target!r})")
    allowed = QUANTIZE[target]
    if quantize is not None and quantize not in allowed:
        if not allowed:
            raise ConfigError(f"--quantize does not apply to --to {target}", hint="drop --quantize")
        raise ConfigError(f"--quantize for {target} must be one of {', '.join(allowed)} (got {quantize!r})")
    if imatrix is not None and quantize not in (*K_QUANTS, *I_QUANTS):
        raise ConfigError(
            "--imatrix is read by llama.cpp's quantizer, for its K- and i-quants only",
            hint="add --quantize with one of them (e.g. q4_k_m or iq4_xs, --to gguf or ollama), or drop --imatrix",
        )
    if imatrix is None and quantize in NEED_IMATRIX:
        raise ConfigError(
            f"--quantize {quantize} needs an importance matrix: llama.cpp refuses this many bits without one",
            hint="add --imatrix auto (from the run's held-out examples) or --imatrix FILE (from llama-imatrix)",
        )


_RUNTIMES = {  # target -> (module, package) pairs: (always needed), (needed to verify or to run llama.cpp's quantizer)
    "gguf": ((("gguf", "gguf"),), (("llama_cpp", "llama-cpp-python"),)),
    "onnx": ((("onnx", "onnx"), ("onnxscript", "onnxscript")), (("onnxruntime", "onnxruntime"),)),
    "coreml": ((("coremltools", "coremltools"),), ()),
}
_RUNTIMES["ollama"] = _RUNTIMES["gguf-adapter"] = _RUNTIMES["ollama-adapter"] = _RUNTIMES["gguf"]


def missing_runtime(target: str, quantize: str | None, verify: bool) -> tuple[list[str], bool]:
    """The packages ``target`` needs that are not installed, and whether ``--no-verify`` would do without them.

    Checked before merging and writing (a minute or more on a big model), so a missing package is said
    at once rather than after the work.  Looked up without importing anything.
    """
    import importlib.util

    always, checking = _RUNTIMES.get(target, ((), ()))
    llama_quantizer = quantize in (*K_QUANTS, *I_QUANTS)
    needed = [*always, *(checking if verify or llama_quantizer else ())]
    missing = [package for module, package in needed if importlib.util.find_spec(module) is None]
    skippable = bool(missing) and not llama_quantizer and all(p in (pk for _, pk in checking) for p in missing)
    return missing, skippable


def export_model(
    source: ExportSource,
    target: str,
    out: Path,
    *,
    quantize: str | None = None,
    check: bool = True,
    force: bool = False,
    imatrix: Path | Calibration | None = None,
) -> ExportResult:
    """Merge ``source``, write it as ``target`` at ``out`` and verify it (unless ``check`` is False).

    ``imatrix`` (K/i-quants): an imatrix file, or token sequences to collect one from with the merged model
    (then saved beside a ``gguf`` export as ``<name>.imatrix.gguf`` for reuse with llama-quantize).
    """
    start = time.perf_counter()
    check_options(target, quantize, imatrix)
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    if out.exists():
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    if target in ADAPTER_TARGETS:  # refuse an adapter the runtime can't apply before the slow merge
        importlib.import_module(f"tunelab.export.{target.replace('-', '_')}").require_adapter(source)
    importance = read_imatrix(imatrix) if isinstance(imatrix, Path) else None  # a bad file fails before the merge
    merged = merge_model(source.base, source.adapter, tokenizer_dir=source.tokenizer_dir, template=source.template)
    if isinstance(imatrix, Calibration):
        importance = _collect(imatrix, merged, out if target == "gguf" else None)
    written = _write(target, merged, out, quantize, source, importance)
    report: Report | None = None
    try:
        if check:
            ref = Reference(merged.model, merged.tokenizer, merged.template)
            report = verify(target, written.precision, written.runtime(), ref, render=written.render)
            raise_if_failed(report, written.path)
    finally:
        if written.cleanup is not None:
            written.cleanup()
    return ExportResult(
        target=target,
        path=written.path,
        precision=written.precision,
        sha256=sha256_of(written.path),
        report=report.to_dict() if report is not None else None,
        notes=tuple(merged.notes + written.notes),
        seconds=time.perf_counter() - start,
    )


def _collect(calibration: Calibration, merged: Merged, beside: Path | None) -> Imatrix:
    """The importance matrix collected now with the merged model (and saved ``beside`` a gguf export)."""
    from tunelab.export import imatrix as importance

    found = importance.collect(merged.model, merged.model.config.to_dict(), calibration)
    if beside is not None:
        beside.parent.mkdir(parents=True, exist_ok=True)
        saved = importance.write(found, beside.with_name(beside.stem + ".imatrix.gguf"))
        found.source += f", saved as {saved}"
    return found


def _write(
    target: str, merged: Merged, out: Path, quantize: str | None, source: ExportSource, imatrix: Imatrix | None
) -> Written:
    from tunelab.export import hf

    if target in ADAPTER_TARGETS:  # each has write_adapter(source, merged, out, quantize) -> Written
        module = importlib.import_module(f"tunelab.export.{target.replace('-', '_')}")
        adapter_written: Written = module.write_adapter(source, merged, out, quantize)
        return adapter_written
    if target == "hf":
        hf.write_hf(merged, out)
        return Written(out, merged.save_dtype, lambda: hf.HFRuntime(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tunelab-merged-", dir=out.parent) as tmp:
        folder = hf.write_hf(merged, Path(tmp) / "merged")
        return _write_from_folder(target, folder, merged, out, quantize, imatrix)


def _write_from_folder(
    target: str, folder: Path, merged: Merged, out: Path, quantize: str | None, imatrix: Imatrix | None
) -> Written:
    """Each target module has ``write(folder, merged, out, quantize) -> Written``; import only the one asked for.

    The GGUF writers (gguf, ollama) also take the importance matrix (check_options let one through only there).
    """
    module = importlib.import_module(f"tunelab.export.{target}")
    extra = {"imatrix": imatrix} if imatrix is not None else {}
    written: Written = module.write(folder, merged, out, quantize, **extra)
    return written


def verify_export(source: ExportSource, written: Written, *, target: str = "export") -> Report:
    """Verify an export written earlier (e.g. with ``check=False``) against a fresh merge of ``source``."""
    merged = merge_model(source.base, source.adapter, tokenizer_dir=source.tokenizer_dir, template=source.template)
    ref = Reference(merged.model, merged.tokenizer, merged.template)
    return verify(target, written.precision, written.runtime(), ref, render=written.render)
