"""The ``gguf-adapter`` target: a run's LoRA adapter in llama.cpp's LoRA GGUF layout.

What llama.cpp (and Ollama's ``ADAPTER``) load next to a base GGUF: a GGUF
whose ``general.type`` is ``adapter``, ``adapter.type`` is ``lora`` and
``adapter.lora.alpha`` the LoRA alpha, holding for each adapted weight ``W``
(named as in the base GGUF, e.g. ``blk.0.attn_q.weight``) two tensors:
``W.lora_a`` (rank x in) and ``W.lora_b`` (out x rank).  llama.cpp adds
``alpha / rank * B @ (A @ x)`` to ``W @ x``.

The rows of B follow the base's rows, so the same per-family changes apply:
Llama's q/k rows are permuted exactly as :mod:`.gguf` permutes the base's.
PEFT scales that llama.cpp can't express with one alpha (rsLoRA's
``alpha / sqrt(rank)``) are folded into B, with alpha written as 0 (llama.cpp
then applies B as is).  Methods that are not a plain low-rank sum (DoRA, IA3,
LoHa, LoKr, prefix tuning) are refused with the reason.

Verification writes the base as a float32 GGUF beside the output, loads it
with the adapter in llama.cpp and compares with the merged model.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError, StateError
from tunelab.export.merge import Merged
from tunelab.export.pipeline import ExportSource, Written

ADAPTER_DTYPES: dict[str, tuple[str, str]] = {"f32": ("float32", "float32"), "f16": ("float16", "float16")}
# PEFT types llama.cpp's adapter format can't hold, and why.
REFUSED: dict[str, str] = {
    "IA3": "IA3 rescales activations by learned vectors; llama.cpp adapters only add a low-rank product to weights",
    "PREFIX_TUNING": "prefix tuning adds trained key/value prefixes, which llama.cpp adapters can't carry",
    "LOHA": "LoHa's Hadamard product of two low-rank pairs is not the A/B sum llama.cpp applies",
    "LOKR": "LoKr's Kronecker product is not the A/B sum llama.cpp applies",
}
_PREFIX = "base_model.model."
_MAGNITUDE = ".lora_magnitude_vector"


def write_adapter(source: ExportSource, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Write ``out`` (the adapter GGUF); verification applies it to a float32 GGUF of the base."""
    from tunelab.export.gguf import write_gguf
    from tunelab.export.gguf_runtime import GGUFRuntime

    adapter = require_adapter(source)
    dtype = quantize or "f16"
    out.parent.mkdir(parents=True, exist_ok=True)
    notes = write_lora_gguf(adapter, source.base, out, dtype=dtype)
    staging = Path(tempfile.mkdtemp(prefix=".tunelab-base-", dir=out.parent))
    base_gguf = staging / "base.gguf"
    try:
        write_gguf(source.base, base_gguf, quant="f32", tokenizer=merged.tokenizer, template=merged.template)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Written(
        out,
        ADAPTER_DTYPES[dtype][1],
        lambda: GGUFRuntime(base_gguf, lora=out),
        notes=notes,
        cleanup=lambda: shutil.rmtree(staging, ignore_errors=True),
    )


@contextlib.contextmanager
def base_gguf(base: Path, *, base_ref: str | None, near: Path) -> Iterator[Path]:
    """A GGUF of the base for llama.cpp to apply an adapter GGUF to (the export table's gguf-adapter row).

    ``base_ref`` is the run's model.path: when it names a .gguf file or an Ollama model, that file is the base
    the user has and runs the adapter with.  Otherwise the HF base folder is written as tunelab's default GGUF
    (f16, bf16 for a bf16 checkpoint: what ``--to gguf`` writes) in a folder beside ``near``, removed on exit.
    """
    from tunelab.export.gguf import default_quant, write_gguf
    from tunelab.hub import gguf_file_for, is_gguf_reference

    own = gguf_file_for(base_ref) if base_ref is not None and is_gguf_reference(base_ref) else None
    if own is not None:
        yield own
        return
    near.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".tunelab-base-", dir=near.parent) as tmp:
        staged = Path(tmp) / "base.gguf"
        write_gguf(base, staged, quant=default_quant(base))
        yield staged


def require_adapter(source: ExportSource, *, allow_dora: bool = False) -> Path:
    """The run's adapter folder, when llama.cpp can apply it; a StateError/ModelError saying why not.

    ``allow_dora`` is for runtimes that apply DoRA's magnitudes themselves (mlx-lm).
    """
    if source.adapter is None:
        raise StateError(
            "this run trained the whole model, so it has no adapter to export",
            hint="export the model itself: --to gguf (or --to ollama without --adapter-only)",
        )
    config = adapter_config(source.adapter)
    kind = str(config.get("peft_type", "LORA"))
    why = REFUSED.get(kind) or (None if kind == "LORA" else f"{kind} adapters are not LoRA")
    if config.get("use_dora") and not allow_dora:
        why = "DoRA rescales every weight column by a learned magnitude after adding the LoRA product; llama.cpp "
        why += "adapters can only add the product"
    if why is None and config.get("bias", "none") != "none":
        why = f"the adapter trains biases (bias={config['bias']!r}), which llama.cpp LoRA adapters can't carry"
    if why is None and config.get("modules_to_save"):
        why = f"the run also trained whole modules ({', '.join(config['modules_to_save'])}) besides the LoRA pairs"
    if why is None and config.get("alpha_pattern"):
        why = "per-module LoRA alphas (alpha_pattern) are not one alpha"
    if why is not None:
        raise ModelError(
            f"llama.cpp can't apply this adapter: {why}",
            hint="export the merged model instead: --to gguf, or --to ollama without --adapter-only",
        )
    return source.adapter


def adapter_config(adapter: Path) -> dict[str, Any]:
    """A PEFT adapter folder's adapter_config.json."""
    config: dict[str, Any] = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return config


def lora_pairs(adapter: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """HF weight name -> (A, B) in float32, from the adapter's safetensors (small: read whole)."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith(_MAGNITUDE):
            continue  # DoRA's magnitudes: see magnitudes()
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in name:
                weight = name.split(marker)[0] + ".weight"
                pairs.setdefault(weight, {})[part] = value.float().numpy()
                break
        else:
            raise ModelError(
                f"the adapter holds {key}, which is not a LoRA A/B matrix (embedding LoRA or a saved module?)",
                hint="export the merged model instead: --to gguf",
            )
    return {name: (p["lora_A"], p["lora_B"]) for name, p in pairs.items()}


def magnitudes(adapter: Path) -> dict[str, np.ndarray]:
    """HF weight name -> DoRA magnitude (one per output row), for a DoRA adapter; empty for plain LoRA."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    out = {}
    for key, value in tensors.items():
        name = key.removeprefix(_PREFIX)
        if name.endswith(_MAGNITUDE):
            out[name.removesuffix(_MAGNITUDE) + ".weight"] = value.float().numpy()
    return out


def write_lora_gguf(adapter: Path, base: Path, out: Path, *, dtype: str = "f16") -> list[str]:
    """Write ``adapter`` (PEFT LoRA) as llama.cpp's LoRA GGUF for the base checkpoint ``base``."""
    import gguf

    from tunelab.export.gguf import family_of, transform

    if dtype not in ADAPTER_DTYPES:
        raise ModelError(f"adapter GGUF tensors are f32 or f16 (got {dtype!r})")
    config = adapter_config(adapter)
    base_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    family = family_of(base_config)
    arch = getattr(gguf.MODEL_ARCH, family.arch)
    names = gguf.get_tensor_name_map(arch, int(base_config["num_hidden_layers"]))
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))
    writer = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0 if rslora else alpha)
    writer.add_name(f"{adapter.name} (LoRA)")
    np_dtype = np.dtype(ADAPTER_DTYPES[dtype][0])
    for hf_name, (a, b) in sorted(lora_pairs(adapter).items()):
        target = names.get_name(hf_name, (".weight", ".bias"))
        if target is None or target == "token_embd.weight" or (family.tied_output and target == "output.weight"):
            raise ModelError(
                f"the adapter changes {hf_name}, which llama.cpp's LoRA GGUF can't adapt for this model",
                hint="export the merged model instead: --to gguf",
            )
        if rslora:  # PEFT scales by alpha / sqrt(rank); llama.cpp only knows alpha / rank
            b = b * (alpha / float(np.sqrt(a.shape[0])))
        b = transform(b, hf_name, base_config, family)
        writer.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a.astype(np_dtype)))
        writer.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b.astype(np_dtype)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    notes = [f"LoRA adapter GGUF ({dtype}), alpha {alpha:g}: load it with its base (llama.cpp --lora, Ollama ADAPTER)"]
    if rslora:
        notes.append("rsLoRA's alpha/sqrt(rank) scale is folded into lora_b (adapter.lora.alpha = 0)")
    return notes
