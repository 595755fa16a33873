"""MLX QLoRA on the CPU: a 4-bit base trains, and its PEFT adapter serves on quantized and full-precision bases."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.integration.conftest import base_config

from tunelab import services
from tunelab.config.load import load_config
from tunelab.errors import ConfigError

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

pytestmark = pytest.mark.slow


def _qlora_config(model: Path, data: Path, out: Path, **method: object) -> dict:
    raw = base_config(model, data, out, steps=20, eval_every=10, lr=1e-2, warmup=0)
    raw["method"].update(name="qlora", dropout=0.0, **method)
    raw["backend"] = "mlx"
    return raw


def _losses(out: Path) -> tuple[float, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    first = next(r["train_loss"] for r in rows if "train_loss" in r)
    last = [r["val_loss"] for r in rows if "val_loss" in r][-1]
    return first, last


def _generate(model: Path, adapter: Path, backend: str = "mlx") -> list[int]:
    from tunelab.inference import load_generator

    generator = load_generator(model=str(model), adapter=str(adapter), chat=True, backend=backend)
    assert generator.backend.name == "mlx"
    ids = generator.prompt_ids("List: tea, rice, honey")
    tokens = list(generator.backend.generate(ids, max_new_tokens=8, temperature=0.0, top_p=1.0, stop_ids=[], seed=0))
    assert len(tokens) == 8 and all(isinstance(t, int) for t in tokens)
    return tokens


def test_mlx_4bit_qlora_trains_and_its_adapter_generates(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from tunelab.convert import convert_checkpoint

    outcome = services.start_run(load_config(_qlora_config(e2e_model, chat_data, tmp_path / "run", group_size=32)))
    shown = services.show_run(outcome.run_id)
    assert shown["backend"] == "mlx"
    first, last = _losses(tmp_path / "run")
    assert last < 0.9 * first, (first, last)
    adapter = outcome.result_dir
    config = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert config["peft_type"] == "LORA" and config["r"] == 4
    _generate(e2e_model, adapter)  # the full-precision base
    quantized = tmp_path / "base-4bit"
    convert_checkpoint(str(e2e_model), quantized, to="mlx", bits=4, group_size=32)
    _generate(quantized, adapter, backend="auto")  # an MLX-quantized base: auto knows only mlx loads it


def test_qlora_quantizes_the_base_and_trains_only_the_adapters(e2e_model: Path) -> None:
    import mlx.nn as nn

    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.mlx.backend import MlxBackend
    from tunelab.hub import load_tokenizer

    backend = MlxBackend()
    method = MethodSpec("qlora", rank=4, bits=4, group_size=32)
    spec = ModelSpec(str(e2e_model), memory_limit_bytes=2**30)  # on a CPU: no limits to set, only a debug line
    info = backend.load(spec, method, OptimSpec(), load_tokenizer(e2e_model))
    assert info.dtype == "4bit/float32"
    quantized = [m for _, m in backend.model.named_modules() if isinstance(m, nn.QuantizedLinear)]
    assert quantized and all(m.bits == 4 and m.group_size == 32 for m in quantized)
    # Every block linear carries (rank × in) + (out × rank) trainables and nothing else trains.
    expected = sum(4 * (layer.lora_a.shape[0] + layer.lora_b.shape[1]) for layer in backend._adapters.values())
    assert info.trainable_params == expected > 0


def test_lora_trains_on_an_mlx_quantized_checkpoint(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from tunelab.convert import convert_checkpoint

    quantized = tmp_path / "base-8bit"
    convert_checkpoint(str(e2e_model), quantized, to="mlx", bits=8, group_size=64)
    raw = _qlora_config(quantized, chat_data, tmp_path / "run")
    raw["method"].update(name="lora")
    raw["backend"] = "auto"  # picks mlx: the checkpoint is MLX-quantized
    outcome = services.start_run(load_config(raw))
    assert services.show_run(outcome.run_id)["backend"] == "mlx"
    first, last = _losses(tmp_path / "run")
    assert last < first, (first, last)
    raw = _qlora_config(quantized, chat_data, tmp_path / "dora")
    raw["method"].update(name="dora")
    with pytest.raises(ConfigError, match="can't train a quantized base"):
        services.start_run(load_config(raw))
