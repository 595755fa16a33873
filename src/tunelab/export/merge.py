"""Merge a run's adapter into its base model, in full precision.

Merging happens in float32 whatever the base's dtype: a LoRA delta added to
bf16 or 4-bit weights in their own precision is partly rounded away, which is
one of the ways an export "loses the fine-tune".  A quantized base is
dequantized first, and the result says so.  The merged weights are written in
the base's float dtype (float32 for a quantized base) by :mod:`tunelab.export.hf`.

torch, transformers and PEFT are imported inside functions.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import ModelError, StateError

_FLOAT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class Merged:
    """A merged model in memory, with the tokenizer and template training used."""

    model: Any
    tokenizer: Any
    template: str | None
    save_dtype: str
    base: Path
    notes: list[str] = field(default_factory=list)


def adapter_kind(adapter: Path) -> str:
    """PEFT type of an adapter folder (``LORA``, ``IA3``, ``PREFIX_TUNING``, …)."""
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    return str(config.get("peft_type", "LORA"))


def merge_model(base: Path, adapter: Path | None, *, tokenizer_dir: Path, template: str | None) -> Merged:
    """Load ``base`` in float32, fold ``adapter`` into its weights and return the plain model.

    ``adapter`` is None for full/freeze runs, whose ``base`` is already the
    trained model.  Prefix tuning keeps trained key/value prefixes outside the
    weights, so it can't be merged and is refused.
    """
    from tunelab.hub import load_tokenizer

    if adapter is not None and adapter_kind(adapter) == "PREFIX_TUNING":
        raise StateError(
            "a prefix-tuning adapter adds trained prefixes at run time and can't be merged into the weights",
            hint="use the adapter with PEFT as is, or train with method.name=lora to get an exportable run",
        )
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="tunelab-dequant-") as tmp:
        source, save_dtype = _plain_base(base, Path(tmp), notes)
        model = _load_float32(source)
    if adapter is not None:
        model = _fold_adapter(model, adapter)
        notes.append(f"merged the {adapter_kind(adapter)} adapter in float32")
    tokenizer = load_tokenizer(tokenizer_dir)
    if template is not None:
        tokenizer.chat_template = template
    return Merged(model, tokenizer, template, save_dtype, base, notes)


def _plain_base(base: Path, tmp: Path, notes: list[str]) -> tuple[Path, str]:
    """An unquantized copy of ``base`` (itself when it isn't quantized) and the dtype to save in."""
    config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    if "quantization" in config:  # mlx-lm's quantized layout: dequantize through tunelab convert
        from tunelab.convert import convert_checkpoint

        bits = config["quantization"].get("bits")
        convert_checkpoint(str(base), tmp / "plain", to="hf", dtype="float32")
        notes.append(f"the base is {bits}-bit MLX-quantized: dequantized it to float32 before merging")
        return tmp / "plain", "float32"
    if "quantization_config" in config:
        method = config["quantization_config"].get("quant_method", "unknown")
        notes.append(f"the base is quantized ({method}): dequantized it to float32 before merging")
        return base, "float32"
    dtype = config.get("dtype") or config.get("torch_dtype") or "float32"
    return base, dtype if dtype in _FLOAT_DTYPES else "float32"


def _load_float32(folder: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"could not load the base model from {folder} ({type(exc).__name__}: {exc})") from None
    if getattr(model, "is_quantized", False) or getattr(model, "quantization_method", None):
        try:
            model = model.dequantize()
        except Exception as exc:  # some quantizers (GPTQ kernels) can't dequantize on this machine
            raise ModelError(
                f"the quantized base in {folder} can't be dequantized here ({exc})",
                hint="point model.path at the unquantized checkpoint and export again",
            ) from None
        model = model.to(torch.float32)
    model.eval()
    return model


def _fold_adapter(model: Any, adapter: Path) -> Any:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(adapter))
    except Exception as exc:
        raise ModelError(
            f"the adapter in {adapter} does not fit the base model ({type(exc).__name__}: {exc})",
            hint="export the run with the base model it was trained on (model.path in its config)",
        ) from None
    probe = _probe_ids(model)
    before = _logits(peft_model, probe)
    merged = peft_model.merge_and_unload()
    diff = float((before - _logits(merged, probe)).abs().max())
    if not diff <= 1e-3 * max(float(before.abs().max()), 1.0):
        raise ModelError(
            f"merging the adapter changed the model's outputs (max logit difference {diff:.3g})",
            hint="this adapter type or layout is not merged correctly by PEFT here; please report it",
        )
    return merged


def _probe_ids(model: Any) -> Any:
    """A few fixed token ids (inside any vocabulary) to compare logits before and after merging."""
    import torch

    vocab = int(model.config.get_text_config().vocab_size)
    return torch.tensor([[i * 7919 % vocab for i in range(1, 17)]])


def _logits(model: Any, ids: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=ids).logits.float()
