"""PEFT's on-disk adapter format, written and read without PEFT (for the MLX backend).

An adapter folder holds ``adapter_config.json`` and ``adapter_model.safetensors``
whose tensors are named ``base_model.model.<module path>.lora_A.weight`` (rank ×
in), ``…lora_B.weight`` (out × rank) and, for DoRA, ``…lora_magnitude_vector``
(out).  Keeping to it lets PEFT, transformers and vLLM load MLX-trained adapters
as they are, and MLX load adapters trained with torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PREFIX = "base_model.model."


@dataclass(frozen=True)
class AdapterSpec:
    """What an adapter folder describes."""

    rank: int
    alpha: float
    dropout: float
    use_dora: bool
    target_modules: tuple[str, ...]
    base_model: str


def write_adapter(folder: Path, spec: AdapterSpec, tensors: dict[str, dict[str, np.ndarray]]) -> None:
    """Write ``tensors`` (module path → {"lora_A", "lora_B"[, "magnitude"]}) in PEFT's layout."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    flat: dict[str, np.ndarray] = {}
    for path, parts in tensors.items():
        flat[f"{PREFIX}{path}.lora_A.weight"] = np.ascontiguousarray(parts["lora_A"], dtype=np.float32)
        flat[f"{PREFIX}{path}.lora_B.weight"] = np.ascontiguousarray(parts["lora_B"], dtype=np.float32)
        if "magnitude" in parts:
            flat[f"{PREFIX}{path}.lora_magnitude_vector"] = np.ascontiguousarray(parts["magnitude"], dtype=np.float32)
    save_file(flat, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": spec.base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "use_dora": spec.use_dora,
        "use_rslora": False,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "target_modules": sorted(spec.target_modules),
        "modules_to_save": None,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")


def read_adapter(folder: Path) -> tuple[AdapterSpec, dict[str, dict[str, np.ndarray]]]:
    """Read a PEFT LoRA/DoRA adapter folder into (spec, module path → tensors)."""
    from safetensors.numpy import load_file

    from tunelab.errors import ModelError

    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    if config.get("peft_type") != "LORA":
        raise ModelError(
            f"{folder}: the MLX backend loads LoRA/DoRA adapters; this one is {config.get('peft_type')}",
            hint="use backend: torch for this adapter",
        )
    tensors: dict[str, dict[str, np.ndarray]] = {}
    names = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude"}
    for key, value in load_file(str(folder / "adapter_model.safetensors")).items():
        for suffix, part in names.items():
            if key.endswith(suffix):
                path = key.removeprefix(PREFIX).removesuffix(suffix).replace(".default", "")
                tensors.setdefault(path, {})[part] = value
    targets = config.get("target_modules") or []
    spec = AdapterSpec(
        rank=int(config["r"]),
        alpha=float(config["lora_alpha"]),
        dropout=float(config.get("lora_dropout") or 0.0),
        use_dora=bool(config.get("use_dora")),
        target_modules=tuple([targets] if isinstance(targets, str) else targets),
        base_model=str(config.get("base_model_name_or_path") or ""),
    )
    return spec, tensors
