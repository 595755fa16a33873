"""Device, dtype and model loading for the torch backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from tunelab.errors import BackendError, ModelError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pick_device(requested: str) -> torch.device:
    """``auto`` prefers CUDA, then Apple's MPS, then CPU; an explicit device must exist."""
    has_mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if has_mps else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise BackendError("device: cuda was requested but no CUDA GPU is visible", hint="set device: auto or cpu")
    if requested == "mps" and not has_mps:
        raise BackendError("device: mps was requested but Metal is not available", hint="set device: auto or cpu")
    return torch.device(requested)


def pick_dtype(requested: str, device: torch.device) -> torch.dtype:
    """bf16 on CUDA when the GPU supports it, fp32 elsewhere (CPU bf16 matmuls are slow and lossy)."""
    if requested != "auto":
        return _DTYPES[requested]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX), so bf16 matmuls beat float32.

    On a 2-core AMD EPYC with AVX512-BF16, a LoRA step of SmolLM2-135M took 2.1 s in bf16 against
    3.5 s in float32; without those instructions bf16 is emulated and slower.  Linux reads the flags
    from /proc/cpuinfo; elsewhere the answer is no.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def load_causal_lm(
    folder: Path, *, dtype: torch.dtype, device: torch.device, attn: str, trust: bool, quantization: Any = None
) -> Any:
    """Load any causal-LM architecture transformers knows (safetensors, sharded or not).

    With ``quantization`` (a bitsandbytes config) the weights are quantized while
    loading, straight onto ``device``: a quantized model can't be moved afterwards.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust}
    if attn != "auto":
        kwargs["attn_implementation"] = attn
    if quantization is not None:
        kwargs.update(quantization_config=quantization, device_map={"": device})
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(str(folder), output_loading_info=True, **kwargs)
        model, info = loaded  # (model, {"missing_keys": ..., ...}) with output_loading_info
    except Exception as exc:
        raise ModelError(
            f"could not load a causal LM from {folder} ({type(exc).__name__}: {exc})",
            hint="check that the folder holds a complete checkpoint of a causal LM architecture",
        ) from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would start them random and train on: a config.json that overstates the weights
        raise ModelError(
            f"{folder}: config.json declares {len(missing)} weight(s) the checkpoint does not hold "
            f"(e.g. {', '.join(missing[:3])}); they would start random",
            hint="restore the config.json that came with these weights, or use the complete checkpoint",
        )
    return model if quantization is not None else model.to(device)  # type: ignore[arg-type]


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The stack of decoder blocks, found as the longest ModuleList (works across architectures)."""
    best: torch.nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and (best is None or len(module) > len(best)):
            best = module
    if best is None:
        raise ModelError("could not find the decoder layers of this model to apply method: freeze")
    return best
