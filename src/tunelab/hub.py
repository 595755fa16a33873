"""Resolve ``model.path`` to a local folder and load its tokenizer.

A local folder is used as is.  Anything else is treated as a hub id and looked
up in the Hugging Face cache first (so a model downloaded once works offline),
then on the hub.  Both backends share this: the tokenizer is framework-free.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint named by ``path``."""
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(
                f"model.path: {local} has no config.json, so it is not a Hugging Face checkpoint folder",
                hint="point model.path at the folder that holds config.json and the *.safetensors files",
            )
        return local
    if local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelError(
            f"model.path: {path} is not a checkpoint folder or a hub id (owner/name)",
            hint="give a local folder with config.json, or a hub id such as Qwen/Qwen2.5-0.5B",
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.py", "*.jinja", "tokenizer*"]
    try:
        return Path(snapshot_download(path, revision=revision, local_files_only=True, allow_patterns=patterns))
    except Exception:
        pass
    require_hub(f"model.path: {path} is not in the local Hugging Face cache")
    try:
        return Path(snapshot_download(path, revision=revision, allow_patterns=patterns))
    except Exception as exc:
        raise ModelError(
            f"model.path: {path} is not in the local Hugging Face cache and could not be downloaded "
            f"({type(exc).__name__})",
            hint="check the id and your connection, or download the model once and point at its folder",
        ) from None


# Seconds to wait for the hub's address and a TCP connection before calling this machine offline.
_PROBE_S = 4.0
_reachable: dict[str, bool] = {}  # endpoint -> answer, so a process probes once


def require_hub(context: str) -> None:
    """Fail at once, naming ``context``, when the hub can't be reached (offline mode, or no network).

    huggingface_hub retries a failed name lookup for ~25 s before giving up; one short probe
    (a DNS lookup and a TCP connect, bounded in time) tells the same thing at once.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise ModelError(
            f"{context}, and HF_HUB_OFFLINE is set, so nothing is downloaded",
            hint="download it once with HF_HUB_OFFLINE unset, or point at a local folder",
        )
    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        _reachable[endpoint] = _probe(endpoint)
    if not _reachable[endpoint]:
        raise ModelError(
            f"{context}, and {endpoint} can't be reached from this machine (no network?)",
            hint="connect and try again, point at a local checkpoint folder, or set HF_HUB_OFFLINE=1 to use "
            "only what is cached without trying the network",
        )


def _probe(endpoint: str) -> bool:
    """Whether a TCP connection to ``endpoint`` opens within :data:`_PROBE_S` (True behind a proxy: can't tell)."""
    import os
    import socket
    import threading
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    result: list[bool] = []

    def connect() -> None:  # in a thread: getaddrinfo ignores socket timeouts and may hang on a dead resolver
        try:
            socket.create_connection((url.hostname or "", port), timeout=_PROBE_S).close()
            result.append(True)
        except OSError:
            result.append(False)

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(_PROBE_S)
    return bool(result and result[0])


def load_tokenizer(folder: Path, *, trust_remote_code: bool = False) -> Any:
    """Load the tokenizer in any form transformers reads, and make sure it can pad."""
    from transformers import AutoTokenizer

    check_config_json(Path(folder))  # transformers reads it first and would blame the tokenizer for it
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise ModelError(
            f"could not load a tokenizer from {folder} ({type(exc).__name__}: {exc})",
            hint="the folder needs tokenizer.json, a SentencePiece tokenizer.model or a tiktoken file",
        ) from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_config_json(folder: Path) -> None:
    """A checkpoint's config.json, when there, must be a JSON object: say so by name if it is not."""
    path = folder / "config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ModelError(
            f"{path} is not valid JSON ({exc})", hint="restore the checkpoint's config.json (it names the architecture)"
        ) from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} is not a JSON object", hint="restore the checkpoint's config.json")


def save_tokenizer(tokenizer: Any, folder: Path) -> None:
    """``save_pretrained``, keeping the SentencePiece ``legacy`` flag transformers 5 leaves out.

    transformers 5 rebuilds a Llama tokenizer's pre-tokenizer from that flag on
    load (ignoring tokenizer.json), so without it a legacy tokenizer comes back
    non-legacy and tokenizes text after special tokens differently.
    """
    tokenizer.save_pretrained(str(folder))
    legacy = getattr(tokenizer, "legacy", None)
    config_file = Path(folder) / "tokenizer_config.json"
    if isinstance(legacy, bool) and config_file.is_file():
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if config.get("legacy") != legacy:
            config["legacy"] = legacy
            config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def architecture_of(folder: Path) -> str:
    """The ``architectures[0]`` (or ``model_type``) from a checkpoint's config.json."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "unknown"
    archs = config.get("architectures") or []
    return str(archs[0] if archs else config.get("model_type", "unknown"))
