"""``--to mlx-adapter``: mlx-lm's adapter layout, loaded by ``mlx_lm.load(base, adapter_path=...)``.

The loaded model must match the merged model's logits, and generate the same
greedy tokens as tunelab's own MLX generation with the run's PEFT adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.export.pipeline import ExportSource, export_model


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-bpe"])
def test_mlx_adapter_loads_in_mlx_lm_and_generates_as_tunelab_does(
    name: str, sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    pytest.importorskip("mlx_lm")
    import mlx.core as mx
    from mlx_lm import load

    from tunelab.backends.mlx.hf_config import rope_fixes
    from tunelab.inference import load_generator

    source = sources[name]
    result = export_model(source, "mlx-adapter", tmp_path / "adapter")
    report = result.report
    assert report is not None and report["passed"], report
    assert report["greedy_agreement"] == 1.0 and report["relative_logit_diff"] < 1e-3
    config = json.loads((result.path / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["lora_parameters"]["scale"] == 2.0  # alpha 8 / rank 4
    assert "self_attn.q_proj" in config["lora_parameters"]["keys"]

    base_config = json.loads((source.base / "config.json").read_text())  # transformers 5 nests rope_theta
    model, _ = load(str(source.base), adapter_path=str(result.path), model_config=rope_fixes(base_config))
    tunelab = load_generator(model=str(source.base), adapter=str(source.adapter), backend="mlx", chat=True)
    prompt = tunelab.prompt_ids("List: milk, eggs, honey")
    want = list(tunelab.backend.generate(prompt, max_new_tokens=12, temperature=0.0, top_p=1.0, stop_ids=[], seed=0))
    seq = list(prompt)
    for _ in range(12):
        seq.append(int(mx.argmax(model(mx.array([seq]))[0, -1]).item()))
    assert seq[len(prompt) :] == want


@pytest.mark.slow  # trains its own DoRA run (~15 s)
def test_dora_adapter_goes_to_mlx_lm_with_its_magnitudes_and_is_refused_for_llama_cpp(
    chat_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """mlx-lm applies DoRA (``m / ||W + s B A||`` per row) as PEFT does; llama.cpp can only add B A."""
    pytest.importorskip("mlx_lm")
    from safetensors.numpy import load_file
    from tests.export.conftest import source_of
    from tests.integration.conftest import base_config, tiny_model_from

    from tunelab import services
    from tunelab.config.load import load_config
    from tunelab.errors import ModelError

    monkeypatch.setenv("TUNELAB_HOME", str(tmp_path / "home"))
    base = tiny_model_from(chat_data, tmp_path / "base", arch="qwen2", hidden_size=64, num_heads=4)
    raw = base_config(base, chat_data, tmp_path / "run", steps=3)
    raw["method"] = {**raw["method"], "name": "dora", "targets": "all-linear"}
    assert services.start_run(load_config(raw)).status == "completed"
    source = source_of(tmp_path / "run", base)

    result = export_model(source, "mlx-adapter", tmp_path / "mlx")
    assert result.report is not None and result.report["passed"], result.report
    assert result.report["relative_logit_diff"] < 1e-3 and result.report["greedy_agreement"] == 1.0
    assert json.loads((result.path / "adapter_config.json").read_text())["fine_tune_type"] == "dora"
    assert "model.layers.0.self_attn.q_proj.m" in load_file(str(result.path / "adapters.safetensors"))
    with pytest.raises(ModelError, match="DoRA rescales every weight column"):
        export_model(source, "gguf-adapter", tmp_path / "adapter.gguf")
