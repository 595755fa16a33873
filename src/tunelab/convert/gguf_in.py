"""``tunelab convert FILE.gguf --to hf``: a GGUF model (llama.cpp, LM Studio, Ollama) as a transformers checkpoint.

The reading itself is :func:`tunelab.hub.gguf_to_hf` (transformers' GGUF
loader: dequantized to the dtype asked, tokenizer and chat template carried
over), which ``model.path: FILE.gguf`` also uses; this module gives it the
``convert`` command's behaviour: a staged folder renamed into place, ``--force``,
and a :class:`ConvertResult`.  ``--to mlx`` goes through the HF folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from tunelab.convert.checkpoint import ConvertResult
from tunelab.convert.files import DTYPES, staging
from tunelab.errors import ConfigError, ModelError

GGUF_TARGETS: tuple[str, ...] = ("hf",)


def is_gguf_source(src: str) -> bool:
    """Whether ``src`` is a GGUF file (by name, or by its magic bytes for a file without the suffix)."""
    path = Path(src).expanduser()
    if src.endswith(".gguf"):
        return True
    if not path.is_file():
        return False
    with path.open("rb") as fh:
        return fh.read(4) == b"GGUF"


def convert_gguf(src: str, out: Path, *, to: str, dtype: str | None = None, force: bool = False) -> ConvertResult:
    """Convert the GGUF file ``src`` into a transformers checkpoint at ``out``; returns a ConvertResult."""
    from tunelab.hub import gguf_to_hf

    start = time.perf_counter()
    path = Path(src).expanduser()
    if to not in GGUF_TARGETS:
        raise ConfigError(
            f"a GGUF file converts --to hf (got --to {to})",
            hint=f"convert it --to hf first, then: tunelab convert {out} --to {to} --out …",
        )
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")
    if not path.is_file():
        raise ModelError(f"{src} does not exist", hint="give the path of a .gguf model file")
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    with staging(out, force=force) as tmp:
        info = gguf_to_hf(path, tmp, dtype=dtype)
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        copied = tuple(sorted(p.name for p in tmp.iterdir() if p.name.startswith(("tokenizer", "chat_template"))))
    notes = []
    if _quantized(path):
        notes.append(f"the GGUF's weights are quantized ({_file_type(path)}): dequantized to {info['dtype']}")
    return ConvertResult(
        out=out,
        to="hf",
        model_type=str(info["model_type"]),
        params=int(info["params"]),
        bytes_written=size,
        seconds=time.perf_counter() - start,
        dtype=str(info["dtype"]),
        copied=copied,
        notes=tuple(notes),
    )


def _file_type(path: Path) -> str:
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.file_type")
    return gguf.LlamaFileType(int(field.contents())).name.removeprefix("MOSTLY_") if field is not None else "F32"


def _quantized(path: Path) -> bool:
    return _file_type(path) not in ("ALL_F32", "F32", "F16", "BF16")
