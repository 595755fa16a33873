"""The files a checkpoint conversion carries and how it writes them: tokenizer and chat-template files copied
byte for byte, the dtype recorded in config.json, and a staging folder renamed into place only when complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, ModelError

DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")

# Everything a tokenizer or a chat template can live in; copied as is when present.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "spiece.model",
    "tiktoken.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "generation_config.json",
)
TOKENIZER_GLOBS: tuple[str, ...] = ("*.tiktoken", "tokenization_*.py")
TEMPLATE_DIR = "additional_chat_templates"


def read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder / 'config.json'} is not readable JSON ({exc})") from None
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f"{folder / 'config.json'} has no model_type, so the architecture is unknown")
    return config


def config_dtype(config: dict[str, Any]) -> str | None:
    text: dict[str, Any] = config["text_config"] if isinstance(config.get("text_config"), dict) else {}
    for value in (config.get("dtype"), config.get("torch_dtype"), text.get("dtype"), text.get("torch_dtype")):
        if value in DTYPES:
            return str(value)
    return None


def main_dtype(weights: dict[str, Any]) -> str | None:
    names = [str(v.dtype).rsplit(".", 1)[-1] for v in weights.values()]
    floats = [n for n in names if n in DTYPES]
    return max(set(floats), key=floats.count) if floats else None


def set_dtype_key(config: dict[str, Any], dtype: str | None) -> None:
    """Record the dtype written, under the key(s) the source used (transformers 5 writes ``dtype``)."""
    if dtype is None:
        return
    keys = [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]
    for key in keys:
        config[key] = dtype


def copy_tokenizer_files(folder: Path, tmp: Path) -> list[str]:
    found = [folder / name for name in TOKENIZER_FILES]
    found += [p for pattern in TOKENIZER_GLOBS for p in sorted(folder.glob(pattern))]
    copied = []
    for path in found:
        if path.is_file():
            shutil.copy2(path, tmp / path.name)
            copied.append(path.name)
    if (folder / TEMPLATE_DIR).is_dir():
        shutil.copytree(folder / TEMPLATE_DIR, tmp / TEMPLATE_DIR)
        copied.append(f"{TEMPLATE_DIR}/")
    return copied


@contextlib.contextmanager
def staging(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield an empty folder beside ``out``; rename it to ``out`` on success, delete it on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes it private; the result should look like any folder
        if not (out.exists() or out.is_symlink()):
            os.replace(tmp, out)
            return
        if not force:
            raise ConfigError(f"{out} appeared while converting", hint="pass --force to replace it")
        old = out.with_name(f".{out.name}.{os.getpid()}.old")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except OSError:
            os.replace(old, out)  # put the previous folder back rather than leave nothing
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
