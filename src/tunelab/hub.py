"""Resolve ``model.path`` to a local folder and load its tokenizer.

A local folder is used as is.  Anything else is treated as a hub id and looked
up in the Hugging Face cache first (so a model downloaded once works offline),
then on the hub.  Both backends share this: the tokenizer is framework-free.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError


def resolve_model_path(path: str, revision: str | None = None) -> Path:
    """Return a local folder holding the checkpoint named by ``path``.

    A ``.gguf`` file, or a model in the local Ollama store, is converted once into
    tunelab's cache (:func:`gguf_checkpoint`) and that folder is returned.
    """
    gguf_file = gguf_file_for(path)
    if gguf_file is not None:
        return gguf_checkpoint(gguf_file)
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
    if not hub_reachable():
        raise ModelError(
            f"{context}, and {endpoint} can't be reached from this machine (no network?)",
            hint="connect and try again, point at a local checkpoint folder, or set HF_HUB_OFFLINE=1 to use "
            "only what is cached without trying the network",
        )


def hub_reachable() -> bool:
    """Whether the hub can be used now: not in offline mode, and its endpoint answers (probed once a process)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    endpoint = constants.ENDPOINT
    if endpoint not in _reachable:
        _reachable[endpoint] = _probe(endpoint)
    return _reachable[endpoint]


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


def in_hub_cache(repo_id: str) -> bool:
    """Whether ``repo_id`` was downloaded once (its config.json is in the local Hugging Face cache)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


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


# --------------------------------------------------------------------------- GGUF files as bases
#
# People's base model is often a GGUF they already have (llama.cpp, LM Studio, Ollama's store).
# tunelab trains transformers checkpoints, so a GGUF is read by transformers' GGUF loader
# (dequantized to float), written as a checkpoint folder once, and that folder is what training,
# generation and export load.  The cache key is the file's path, size and modification time.

GGUF_MAGIC = b"GGUF"
_GGUF_FLOAT = {"ALL_F32": "float32", "MOSTLY_F16": "float16", "MOSTLY_BF16": "bfloat16"}


def gguf_file_for(path: str) -> Path | None:
    """The GGUF file that ``path`` names (a .gguf file, or an Ollama model name), or None for anything else."""
    local = Path(path).expanduser()
    if path.endswith(".gguf"):
        if not local.is_file():
            raise ModelError(
                f"model.path: {path} does not exist",
                hint="give the path of a .gguf file, a checkpoint folder or a hub id",
            )
        return local
    if local.exists() or (path.count("/") == 1 and ":" not in path):
        return None  # a folder, or a hub id (owner/name) that Ollama names would shadow
    return ollama_blob(path)


def is_gguf_reference(path: str) -> bool:
    """Whether ``model.path`` names a GGUF file or an Ollama model (what an adapter-only Modelfile can FROM)."""
    try:
        return gguf_file_for(path) is not None
    except ModelError:
        return False


def ollama_models_dir() -> Path:
    """Ollama's store: ``$OLLAMA_MODELS``, or ``~/.ollama/models`` (read, never written)."""
    import os

    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def ollama_blob(name: str) -> Path | None:
    """The model layer (a GGUF blob) of ``name[:tag]`` in the local Ollama store, or None if it isn't there."""
    if not name or name.startswith((".", "/", "~")) or any(c.isspace() for c in name):
        return None
    model, _, tag = name.partition(":")
    parts = model.split("/")
    if len(parts) == 1:
        parts = ["library", *parts]  # "smollm2" is registry.ollama.ai/library/smollm2
    store = ollama_models_dir()
    manifest = store / "manifests" / "registry.ollama.ai" / Path(*parts) / (tag or "latest")
    if not manifest.is_file():
        return None
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8")).get("layers", [])
    except (OSError, ValueError):
        raise ModelError(f"Ollama's manifest for {name} ({manifest}) is not valid JSON") from None
    digests = [x.get("digest", "") for x in layers if x.get("mediaType") == "application/vnd.ollama.image.model"]
    blob = store / "blobs" / digests[0].replace(":", "-") if digests else None
    if blob is None or not blob.is_file():
        raise ModelError(
            f"Ollama's store lists {name} but its model file is missing", hint=f"ollama pull {name}, then try again"
        )
    return blob


def gguf_cache_dir() -> Path:
    """Where converted GGUF bases live: ``$TUNELAB_HOME/cache/gguf`` (hub can't import settings: same layer)."""
    import os

    return Path(os.environ.get("TUNELAB_HOME") or Path.home() / ".tunelab").expanduser() / "cache" / "gguf"


def gguf_checkpoint(src: Path) -> Path:
    """The checkpoint folder converted from the GGUF file ``src``, converting it the first time."""
    import hashlib
    import os
    import shutil
    import tempfile

    stat = src.stat()
    key = hashlib.sha256(f"{src.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = gguf_cache_dir() / f"{src.stem[:40]}-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        gguf_to_hf(src, tmp)
        tmp.chmod(0o755)
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():  # another process won the race: use its copy
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def gguf_float_dtype(src: Path) -> str:
    """The float dtype to hold a GGUF's weights in: its own for a float file, float16 for a quantized one.

    A quantized weight dequantizes to an f16 scale times a small integer (plus an f16 offset), which
    float16's 11-bit mantissa nearly holds: on SmolLM2-135M-Instruct Q4_1 a float16 copy moved the logits
    by 0.11% of the largest one against a float32 copy (bfloat16: 0.73%), same argmax everywhere, at half
    the size (269 vs 538 MB; a 7B Q4 file becomes ~14 GB, not ~28).  Training computes in its own dtype
    (model.dtype) whatever the copy holds.  A weight too large for float16 is caught in :func:`gguf_to_hf`.
    """
    import gguf

    reader = gguf.GGUFReader(src)  # within _one_parse: the block's shared reader
    field = reader.fields.get("general.file_type")
    file_type = gguf.LlamaFileType(int(field.contents())).name if field is not None else "ALL_F32"
    return _GGUF_FLOAT.get(file_type, "float16")


@contextmanager
def _one_parse(src: Path) -> Iterator[None]:
    """Within the block, every ``gguf.GGUFReader(src)`` is one reader, and gguf's tensor-name maps are memoised.

    transformers' GGUF loader parses the file's metadata anew for the config, the tokenizer and the
    weights, and builds gguf's name map once per module.  On SmolLM2-135M-Instruct (a 49,152-token
    vocabulary and its merges, parsed in pure Python) those repeats were 23 of the conversion's 38 s.
    Both names are looked up on the ``gguf`` module when called, so swapping them there is enough;
    the originals are back when the block ends.  The reader only maps the file read-only.
    """
    import functools

    import gguf

    real_reader, real_map = gguf.GGUFReader, gguf.get_tensor_name_map
    target = src.resolve()
    shared = real_reader(src)

    def reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and Path(path).resolve() == target:
            return shared
        return real_reader(path, *args, **kwargs)

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.cache(real_map)  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = real_reader, real_map  # type: ignore[misc]


def _finite_half(weight: Any) -> bool:
    """No inf/NaN in a float16 tensor, read from its bits: an all-ones exponent (0x7C00) is inf or NaN.

    The integer test is ~10x faster on CPU than ``isfinite``, which computes in float16 there.
    """
    import torch

    return not bool((weight.view(dtype=torch.int16) & 0x7C00).eq(0x7C00).any())


def gguf_to_hf(src: Path, out: Path, *, dtype: str | None = None) -> dict[str, Any]:
    """Write the GGUF file ``src`` as a transformers checkpoint (weights, config, tokenizer, template) in ``out``.

    Read by transformers' GGUF loader, which undoes llama.cpp's q/k row order and dequantizes;
    returns ``{"model_type", "params", "dtype"}``.
    """
    with src.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise ModelError(f"{src} is not a GGUF file", hint="give a .gguf model file (llama.cpp's format)")
    with _one_parse(src):
        return _gguf_to_hf(src, out, dtype)


def _gguf_to_hf(src: Path, out: Path, dtype: str | None) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    chosen = dtype or gguf_float_dtype(src)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=getattr(torch, chosen))
        if dtype is None and chosen == "float16" and not all(_finite_half(p.data) for p in model.parameters()):
            chosen = "bfloat16"  # a dequantized weight past float16's range (65504): keep float32's range
            model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.bfloat16)
    except ValueError as exc:
        if "not supported" not in str(exc):
            raise ModelError(f"could not read {src} as a GGUF model ({exc})") from None
        from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

        readable = ", ".join(k for k in GGUF_CONFIG_MAPPING if k not in ("general", "tokenizer"))
        raise ModelError(
            f"{src.name}: {exc} (transformers' GGUF loader reads {readable})",
            hint="use the model's transformers checkpoint (a hub id or folder) as model.path instead",
        ) from None
    except Exception as exc:
        raise ModelError(f"could not read {src} as a GGUF model ({type(exc).__name__}: {exc})") from None
    # The weights are already dequantized; transformers still marks the model "quantized with gguf",
    # which would refuse to save it and make every later load look for the GGUF file.
    plain: Any = model
    plain.hf_quantizer, plain.is_quantized, plain.quantization_method = None, False, None
    if hasattr(plain.config, "quantization_config"):
        del plain.config.quantization_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
    params = sum(p.numel() for p in model.parameters())
    return {"model_type": str(model.config.model_type), "params": int(params), "dtype": chosen}
