"""The ``mlx-adapter`` target: a run's LoRA adapter in mlx-lm's adapter layout.

``adapters.safetensors`` + ``adapter_config.json``, what ``mlx_lm.generate
--adapter-path`` (and LM Studio's MLX engine) load over the base model.
mlx-lm's LoRA layer computes ``W x + scale * (x @ lora_a) @ lora_b`` with
``lora_a`` (in x rank) and ``lora_b`` (rank x out): PEFT's A and B transposed,
and PEFT's scaling (alpha / rank, or alpha / sqrt(rank) for rsLoRA) as
``scale``.  mlx-lm wraps the listed ``keys`` of the last ``num_layers`` blocks;
every block is listed, and blocks the run did not adapt keep mlx-lm's
zero-initialised ``lora_b`` (no change).

Verification loads the base with ``mlx_lm.load(base, adapter_path=out)`` and
compares with the merged model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from tunelab.errors import ModelError
from tunelab.export.gguf_adapter import adapter_config, lora_pairs, magnitudes
from tunelab.export.gguf_adapter import require_adapter as _require_lora
from tunelab.export.merge import Merged
from tunelab.export.mlx import MLXRuntime
from tunelab.export.pipeline import ExportSource, Written

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")


def require_adapter(source: ExportSource) -> Path:
    """A LoRA or DoRA adapter (mlx-lm applies DoRA's magnitudes as PEFT does: ``m / ||W + s B A||`` per row)."""
    return _require_lora(source, allow_dora=True)


def write_adapter(source: ExportSource, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Write ``out/adapters.safetensors`` and ``out/adapter_config.json``."""
    from safetensors.numpy import save_file

    adapter = require_adapter(source)
    config = adapter_config(adapter)
    base_config = json.loads((source.base / "config.json").read_text(encoding="utf-8"))
    tensors: dict[str, np.ndarray] = {}
    keys: set[str] = set()
    ranks: set[int] = set()
    for hf_name, (a, b) in lora_pairs(adapter).items():
        match = _LAYER.match(hf_name)
        if match is None:
            raise ModelError(
                f"the adapter changes {hf_name}, outside the decoder blocks mlx-lm's adapters wrap",
                hint="export the merged model instead: --to mlx",
            )
        keys.add(match.group(2))
        ranks.add(int(a.shape[0]))
        module = hf_name.removesuffix(".weight")
        tensors[f"{module}.lora_a"] = np.ascontiguousarray(a.T)
        tensors[f"{module}.lora_b"] = np.ascontiguousarray(b.T)
    for hf_name, magnitude in magnitudes(adapter).items():
        tensors[f"{hf_name.removesuffix('.weight')}.m"] = magnitude
    if len(ranks) != 1:
        raise ModelError(
            f"the adapter's modules have different ranks ({sorted(ranks)}); mlx-lm's adapter config has one",
            hint="export the merged model instead: --to mlx",
        )
    rank = ranks.pop()
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / (rank**0.5 if config.get("use_rslora") else rank)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapters.safetensors"))
    mlx_config = {
        "fine_tune_type": "dora" if config.get("use_dora") else "lora",
        "num_layers": int(base_config["num_hidden_layers"]),
        "lora_parameters": {"rank": rank, "scale": scale, "dropout": 0.0, "keys": sorted(keys)},
    }
    (out / "adapter_config.json").write_text(json.dumps(mlx_config, indent=2) + "\n", encoding="utf-8")
    kind = "DoRA" if config.get("use_dora") else "LoRA"
    notes = [f"mlx-lm {kind} adapter: rank {rank}, scale {scale:g}, {len(keys)} module kinds per block"]
    return Written(out, "float32", lambda: MLXRuntime(source.base, adapter=out), notes=notes)
