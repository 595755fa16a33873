"""Convert a checkpoint between the Hugging Face and the mlx-lm layouts.

``--to mlx`` loads a transformers checkpoint through mlx-lm's own model code,
optionally quantizes it (MLX affine quantization) and writes a folder that
``mlx_lm.load`` reads.  ``--to hf`` goes back: it loads an mlx-lm folder,
dequantizes it when needed and writes safetensors plus a config.json that
``AutoModelForCausalLM.from_pretrained`` reads.  Both carry the tokenizer and
chat-template files over byte for byte, and both write into a temporary folder
that is renamed into place only once everything is there.

mlx, mlx-lm and torch are imported inside functions: importing this module is
free, and a machine without torch still converts to MLX.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.backends.mlx.hf_config import rope_fixes
from tunelab.convert.files import (
    DTYPES,
    TEMPLATE_DIR,
    config_dtype,
    copy_tokenizer_files,
    main_dtype,
    read_config,
    set_dtype_key,
    staging,
)
from tunelab.errors import ConfigError, ModelError

TARGETS: tuple[str, ...] = ("mlx", "hf")
QUANT_BITS: tuple[int, ...] = (4, 8)
GROUP_SIZES: tuple[int, ...] = (32, 64, 128)

_QUANT_KEYS = ("quantization", "quantization_config")
# mlx-lm -> transformers round trips checked to be exact (weights and logits) with mlx-lm 0.32 / transformers 5.
VERIFIED_HF_ROUND_TRIP: tuple[str, ...] = ("gemma", "gemma2", "llama", "mistral", "phi3", "qwen2", "qwen3")


@dataclass(frozen=True)
class ConvertResult:
    """What :func:`convert_checkpoint` wrote."""

    out: Path
    to: str
    model_type: str
    params: int
    bytes_written: int
    seconds: float
    dtype: str | None = None
    bits: int | None = None
    group_size: int | None = None
    dequantized_bits: int | None = None
    copied: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default_factory=tuple)


def convert_checkpoint(
    src: str,
    out: Path,
    *,
    to: str,
    bits: int | None = None,
    group_size: int = 64,
    dtype: str | None = None,
    force: bool = False,
) -> ConvertResult:
    """Convert ``src`` (folder or hub id) to ``to`` ("mlx" or "hf") in ``out``; see the module docstring."""
    from tunelab.convert.gguf_in import convert_gguf, is_gguf_source

    if is_gguf_source(src):  # a llama.cpp / Ollama / LM Studio model file
        if bits is not None:
            raise ConfigError("--quantize does not apply to a GGUF source", hint="drop --quantize")
        return convert_gguf(src, Path(out).expanduser(), to=to, dtype=dtype, force=force)
    start = time.perf_counter()
    _check_options(to=to, bits=bits, group_size=group_size, dtype=dtype)
    out = Path(out).expanduser()
    if (out.exists() or out.is_symlink()) and not force:
        raise ConfigError(f"{out} already exists", hint="pass --force to replace it, or choose another --out")
    folder = _resolve_source(src)
    if out.resolve() == folder.resolve() or out.resolve() in folder.resolve().parents:
        raise ConfigError(f"--out {out} would replace the source checkpoint {folder}", hint="choose another --out")
    config = read_config(folder)
    _prepare_mlx()
    model_type = _check_mlx_supports(config)
    notes: list[str] = []
    with staging(out, force=force) as tmp:
        if to == "mlx":
            params, written_dtype = _to_mlx(folder, tmp, config, bits=bits, group_size=group_size, dtype=dtype)
            dequantized = None
        else:
            params, written_dtype, dequantized = _to_hf(folder, tmp, config, dtype=dtype, notes=notes)
        copied = copy_tokenizer_files(folder, tmp)
        if not any(name != "generation_config.json" for name in copied):
            notes.append(f"{folder} has no tokenizer files, so {out} holds weights and config only")
        size = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    return ConvertResult(
        out=out,
        to=to,
        model_type=model_type,
        params=params,
        bytes_written=size,
        seconds=time.perf_counter() - start,
        dtype=written_dtype,
        bits=bits,
        group_size=group_size if bits else None,
        dequantized_bits=dequantized,
        copied=tuple(copied),
        notes=tuple(notes),
    )


# --------------------------------------------------------------------------- checks


def _check_options(*, to: str, bits: int | None, group_size: int, dtype: str | None) -> None:
    if to not in TARGETS:
        raise ConfigError(f"--to must be one of {', '.join(TARGETS)} (got {to!r})")
    if bits is not None and to != "mlx":
        raise ConfigError("--quantize only applies to --to mlx", hint="drop --quantize, or convert --to mlx")
    if bits is not None and bits not in QUANT_BITS:
        raise ConfigError(f"--quantize must be one of {', '.join(map(str, QUANT_BITS))} bits (got {bits})")
    if group_size not in GROUP_SIZES:
        raise ConfigError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))} (got {group_size})")
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)} (got {dtype!r})")


def _resolve_source(src: str) -> Path:
    """A local checkpoint folder for ``src``, downloading a hub id if it is not cached."""
    from tunelab.hub import resolve_model_path

    local = Path(src).expanduser()
    hint = "give a folder that holds config.json and model*.safetensors, or a hub id such as Qwen/Qwen2.5-0.5B"
    if local.exists() and not local.is_dir():
        raise ModelError(f"{src} is a file, not a checkpoint folder", hint=hint)
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelError(f"{local} has no config.json, so it is not a model checkpoint", hint=hint)
    if not local.exists() and (src.startswith((".", "/", "~")) or src.count("/") != 1):
        raise ModelError(f"{src} does not exist and is not a hub id (owner/name)", hint=hint)
    try:
        folder = resolve_model_path(src)
    except ModelError as exc:  # its messages name the training config's key, not this command's argument
        raise ModelError(exc.message.removeprefix("model.path: "), hint=exc.hint) from None
    if not local.exists():
        _fetch_templates(src, folder)
    if not list(folder.glob("model*.safetensors")):
        if list(folder.glob("*.bin")) or list(folder.glob("*.pt")):
            raise ModelError(
                f"{folder} holds PyTorch .bin weights; mlx-lm reads only model*.safetensors",
                hint="load it with transformers and save_pretrained() it again, which writes safetensors",
            )
        raise ModelError(f"{folder} has no model*.safetensors weights", hint=hint)
    return folder


def _fetch_templates(repo: str, folder: Path) -> None:
    """Best effort: hub.py's download patterns leave out standalone chat templates (``*.jinja``)."""
    from huggingface_hub import snapshot_download

    patterns = ["*.jinja", f"{TEMPLATE_DIR}/*"]
    for offline in (True, False):
        try:
            snapshot_download(repo, local_files_only=offline, allow_patterns=patterns)
            return
        except Exception:
            continue


def _prepare_mlx() -> None:
    """On Linux, point MLX at a fast BLAS before mlx.core is imported for the first time."""
    from tunelab.backends.mlx.blas import ensure_fast_blas

    ensure_fast_blas()


def _check_mlx_supports(config: dict[str, Any]) -> str:
    from mlx_lm import __version__
    from mlx_lm.utils import _get_classes

    model_type = str(config["model_type"])
    try:
        _get_classes(config)
    except ValueError:
        raise ModelError(
            f"mlx-lm {__version__} has no model for model_type {model_type!r}, so it can't convert this checkpoint",
            hint=f"model types mlx-lm supports here: {', '.join(mlx_model_types())}",
        ) from None
    return model_type


def mlx_model_types() -> list[str]:
    """The ``model_type`` values the installed mlx-lm has a model for (aliases included)."""
    import importlib.util

    from mlx_lm.utils import MODEL_REMAPPING

    names = set(MODEL_REMAPPING)
    spec = importlib.util.find_spec("mlx_lm.models")
    for location in (spec.submodule_search_locations or []) if spec else []:
        for path in Path(location).glob("*.py"):
            text = path.read_text(encoding="utf-8", errors="replace")
            if "class Model(" in text and "class ModelArgs" in text:  # helper modules define neither
                names.add(path.stem)
    return sorted(names)


# --------------------------------------------------------------------------- HF -> MLX


def _to_mlx(
    folder: Path, tmp: Path, config: dict[str, Any], *, bits: int | None, group_size: int, dtype: str | None
) -> tuple[int, str | None]:
    """Write ``folder`` as an mlx-lm checkpoint into ``tmp``; return (parameters, float dtype)."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    if any(key in config for key in _QUANT_KEYS):
        raise ModelError(
            f"{folder} is already quantized, and re-quantizing would compound the rounding error",
            hint="convert the unquantized checkpoint instead, or use this one with mlx-lm as is",
        )
    fixes = rope_fixes(config)
    model, _ = _load_mlx(folder, fixes)
    target = dtype or config_dtype(config)
    if target is not None:
        _cast(model, target)
    weights = _parameters(model)
    params, target = sum(int(v.size) for v in weights.values()), target or main_dtype(weights)
    del weights  # save_model donates the arrays to free memory as it writes; keep no references
    new_config = {**config, **fixes}
    set_dtype_key(new_config, target)
    if bits is not None:
        # quantize_model prints a bits-per-weight line; the library stays silent.
        with contextlib.redirect_stdout(io.StringIO()):
            model, new_config = quantize_model(model, new_config, group_size, bits, mode="affine")
    keep_vision = "vision_tower" in getattr(model, "model", {})
    save_model(tmp, model, donate_model=True)
    save_config(new_config, config_path=tmp / "config.json", keep_vision_config=keep_vision)
    return params, target


# --------------------------------------------------------------------------- MLX -> HF


def _to_hf(
    folder: Path, tmp: Path, config: dict[str, Any], *, dtype: str | None, notes: list[str]
) -> tuple[int, str | None, int | None]:
    """Write ``folder`` as a transformers checkpoint; return (parameters, float dtype, dequantized bits)."""
    from mlx_lm.utils import dequantize_model

    model, loaded = _load_mlx(folder, {})
    quant = loaded.get("quantization")
    dequantized = None
    if quant:
        model = dequantize_model(model)
        dequantized = int(quant.get("bits", 0)) or None
    target = dtype or config_dtype(config)
    if target is not None:
        _cast(model, target)
    weights = _parameters(model)
    target = target or main_dtype(weights)
    hf_config = {k: v for k, v in config.items() if k not in _QUANT_KEYS}
    set_dtype_key(hf_config, target)
    (tmp / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    _check_hf_layout(tmp, weights, str(config["model_type"]), notes)
    if config["model_type"] not in VERIFIED_HF_ROUND_TRIP:
        notes.append(
            f"weight names and shapes match transformers' {config['model_type']}, but the round trip is verified "
            f"only for {', '.join(VERIFIED_HF_ROUND_TRIP)}: compare a few outputs before relying on it"
        )
    _save_hf_weights(tmp, weights)
    return sum(int(v.size) for v in weights.values()), target, dequantized


def _check_hf_layout(tmp: Path, weights: dict[str, Any], model_type: str, notes: list[str]) -> None:
    """Refuse when mlx-lm's weight names or shapes aren't what transformers' model for this config expects.

    mlx-lm renames, stacks or transposes weights for some architectures (MoE
    experts, SSM convolutions); those folders would load into transformers as
    random weights, so they are refused rather than written.
    """
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM
    except ImportError:
        notes.append("torch is not installed, so the weight names were not checked against transformers")
        return
    try:
        hf_config = AutoConfig.from_pretrained(tmp)
        with torch.device("meta"):
            reference = AutoModelForCausalLM.from_config(hf_config)
    except (ValueError, KeyError) as exc:
        raise ModelError(f"transformers can't build a causal LM for model_type {model_type!r} ({exc})") from None
    expected = {name: tuple(t.shape) for name, t in reference.state_dict().items()}
    unexpected = [k for k in weights if k not in expected or expected[k] != tuple(weights[k].shape)]
    missing = [name for name, _ in reference.named_parameters() if name not in weights]
    if unexpected or missing:
        example = (unexpected or missing)[0]
        raise ModelError(
            f"mlx-lm keeps {model_type} weights in a layout transformers does not read "
            f"({len(unexpected)} unexpected or reshaped, {len(missing)} missing, e.g. {example})",
            hint="converting this architecture back to Hugging Face is not supported; keep the original checkpoint",
        )


def _save_hf_weights(tmp: Path, weights: dict[str, Any]) -> None:
    """Safetensors shards named and indexed the way transformers writes them."""
    import mlx.core as mx
    from mlx_lm.utils import make_shards

    shards = make_shards(weights)
    total = len(shards)
    index: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        name = "model.safetensors" if total == 1 else f"model-{i:05d}-of-{total:05d}.safetensors"
        mx.save_safetensors(str(tmp / name), shard, metadata={"format": "pt"})
        index.update(dict.fromkeys(shard, name))
    if total > 1:
        meta = {"total_size": sum(int(v.nbytes) for v in weights.values())}
        body = {"metadata": meta, "weight_map": dict(sorted(index.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(body, indent=2) + "\n", encoding="utf-8")


# --------------------------------------------------------------------------- shared helpers


def _load_mlx(folder: Path, overrides: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """mlx-lm's ``load_model`` (lazy), with its exceptions turned into messages about the checkpoint."""
    from mlx_lm.utils import load_model

    try:
        return load_model(folder, lazy=True, model_config=overrides or None)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        detail = " ".join(str(exc).split())
        model_type = read_config(folder)["model_type"]
        hint = "check that config.json and the *.safetensors files belong together and are complete"
        if "not in model" in detail:
            hint = (
                f"mlx-lm's {model_type} model has no place for these weights (e.g. it ties lm_head to the "
                "embeddings where this checkpoint keeps its own), so converting would drop them"
            )
        raise ModelError(f"mlx-lm can't load {folder} as a {model_type} model: {detail}", hint=hint) from None


def _cast(model: Any, dtype: str) -> None:
    """Cast floating parameters to ``dtype``, leaving alone those the model keeps in full precision."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    target = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(path: str, value: Any) -> Any:
        return value.astype(target) if keep(path) and mx.issubdtype(value.dtype, mx.floating) else value

    model.update(tree_map_with_path(cast, model.parameters()))


def _parameters(model: Any) -> dict[str, Any]:
    """The model's parameters by dotted name (mlx-lm's and transformers' names agree for dense models)."""
    from mlx.utils import tree_flatten

    flat: Any = tree_flatten(model.parameters())  # typed as a union of list and dict; it is a list here
    return dict(flat)
