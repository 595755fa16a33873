"""What an MLX run writes: the adapter (PEFT layout) or whole model, and training checkpoints.

The result folder is the same as torch's: a PEFT adapter (``adapter_model.safetensors``
+ ``adapter_config.json``) for LoRA/DoRA/QLoRA, a whole ``model.safetensors``
with the base's config for full/freeze, plus the tokenizer.  A checkpoint holds
the trainable weights, the optimizer state and the count of micro-batches seen
(dropout is reseeded from it, so a resumed run draws the same masks).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from tunelab.backends.base import MethodSpec
from tunelab.backends.mlx.layers import LoRALinear
from tunelab.backends.peft_format import AdapterSpec, write_adapter
from tunelab.errors import StateError
from tunelab.hub import save_tokenizer
from tunelab.vocab import LORA_METHODS

TRAINABLE_FILE = "trainable.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "mlx_state.json"


def flat(tree: Any) -> dict[str, Any]:
    """A parameter/state tree as ``{"a.b.0.c": array}`` (the safetensors layout)."""
    return {str(k): v for k, v in tree_flatten(tree)}  # type: ignore[str-unpack]


def save_result(
    path: Path, model: Any, method: MethodSpec, adapters: dict[str, LoRALinear], base_folder: Path, tokenizer: Any
) -> None:
    """The run's result: a PEFT adapter (LoRA methods) or the whole model, with the tokenizer."""
    path.mkdir(parents=True, exist_ok=True)
    if method.name in LORA_METHODS:
        spec = AdapterSpec(
            rank=method.rank,
            alpha=method.alpha,
            dropout=method.dropout,
            use_dora=method.name == "dora",
            target_modules=tuple(adapters),
            base_model=str(base_folder),
        )
        write_adapter(path, spec, {p: layer.peft_tensors() for p, layer in adapters.items()})
    else:
        _save_full_model(path, model, base_folder)
    save_tokenizer(tokenizer, path)  # keeps the SentencePiece legacy flag


def _save_full_model(path: Path, model: Any, base_folder: Path) -> None:
    mx.save_safetensors(str(path / "model.safetensors"), flat(model.parameters()), metadata={"format": "mlx"})
    config = json.loads((base_folder / "config.json").read_text(encoding="utf-8"))
    (path / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if (base_folder / "generation_config.json").is_file():
        shutil.copyfile(base_folder / "generation_config.json", path / "generation_config.json")


def save_checkpoint(path: Path, model: Any, optimizer: Any, micro_batches: int) -> None:
    """Trainable weights, optimizer state and the micro-batch count, into ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(path / TRAINABLE_FILE), flat(model.trainable_parameters()))
    mx.save_safetensors(str(path / OPTIMIZER_FILE), flat(optimizer.state))
    (path / STATE_FILE).write_text(json.dumps({"micro_batches": micro_batches}), encoding="utf-8")


def load_checkpoint(path: Path, model: Any, optimizer: Any) -> int:
    """Restore weights and optimizer from ``path``; returns the micro-batch count it was saved at."""
    saved = _load(path / TRAINABLE_FILE)
    if set(saved) != set(flat(model.trainable_parameters())):
        raise StateError(
            f"checkpoint {path} does not match this model/method (different trainable weights)",
            hint="resume with the config the run was started with",
        )
    model.load_weights(list(saved.items()), strict=False)
    optimizer.state = tree_unflatten(list(_load(path / OPTIMIZER_FILE).items()))
    micro = int(json.loads((path / STATE_FILE).read_text(encoding="utf-8"))["micro_batches"])
    mx.eval(model.parameters(), optimizer.state)
    return micro


def _load(path: Path) -> dict[str, Any]:
    loaded = mx.load(str(path))
    assert isinstance(loaded, dict)
    return loaded
