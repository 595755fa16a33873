"""The hf target: merged safetensors, tokenizer, training template and stop ids; broken ones are caught."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.numpy import load_file, save_file

from tunelab.export.hf import HFRuntime
from tunelab.export.pipeline import ExportSource, Written, export_model, verify_export
from tunelab.hub import load_tokenizer


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-sp", "llama-sp-legacy"])
def test_hf_export_is_verified(name: str, sources: dict[str, ExportSource], tmp_path: Path) -> None:
    result = export_model(sources[name], "hf", tmp_path / "hf")
    report = result.report
    assert report is not None and report["passed"], report
    assert report["max_logit_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
    assert report["tokenization_match"] and report["template_match"]
    tokenizer = load_tokenizer(result.path)
    assert tokenizer.chat_template == sources[name].template
    stops = json.loads((result.path / "generation_config.json").read_text())["eos_token_id"]
    stops = stops if isinstance(stops, list) else [stops]
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stops  # the ChatML turn end stops generation
    assert tokenizer.eos_token_id in stops
    assert not list(result.path.glob("adapter_*"))  # a plain checkpoint, not an adapter
    # transformers 5 drops the SentencePiece legacy flag when saving; the export keeps it.
    if name.startswith("llama-sp"):
        assert tokenizer.legacy is (name == "llama-sp-legacy")


def _exported(sources: dict[str, ExportSource], tmp_path: Path) -> Path:
    return export_model(sources["qwen2-bpe"], "hf", tmp_path / "hf", check=False).path


def test_corrupt_tensor_fails_verification(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    folder = _exported(sources, tmp_path)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if "layers.1.mlp.down_proj" in k)
    weights[name] = weights[name] * 3.0  # the kind of damage a wrong transpose or scale does
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    report = verify_export(sources["qwen2-bpe"], Written(folder, "float32", lambda: HFRuntime(folder)))
    assert not report.passed and report.template_match and report.tokenization_match
    assert any("logits differ" in f for f in report.failures)


def test_corrupt_template_fails_verification(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    folder = _exported(sources, tmp_path)
    template = folder / "chat_template.jinja"
    template.write_text(template.read_text().replace("'\\n'", "'\\n\\n'", 1))
    report = verify_export(sources["qwen2-bpe"], Written(folder, "float32", lambda: HFRuntime(folder)))
    assert report.template_match is False and not report.passed
    assert any("chat template" in f for f in report.failures)


@pytest.mark.parametrize("method", ["full", "dora", "prefix"])
def test_other_methods_export_or_are_refused(method: str, chat_data: Path, tmp_path: Path) -> None:
    from tests.integration.conftest import base_config, tiny_model_from

    from tunelab import services
    from tunelab.config.load import load_config
    from tunelab.errors import StateError

    model = tiny_model_from(chat_data, tmp_path / "base", arch="qwen2")
    raw = base_config(model, chat_data, tmp_path / "run", steps=3)
    raw["method"]["name"] = method
    run_id = services.start_run(load_config(raw)).run_id
    if method == "prefix":  # its trained prefixes live outside the weights
        with pytest.raises(StateError, match="can't be merged"):
            services.export_run(run_id, to="hf", out=tmp_path / "hf")
        return
    result = services.export_run(run_id, to="hf", out=tmp_path / "hf")
    assert result.report is not None and result.report["passed"], result.report
    kinds = [a["kind"] for a in services.show_run(run_id)["artifact_list"]]
    assert "export:hf" in kinds


def test_large_models_are_sharded(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    from tunelab.export.hf import write_hf
    from tunelab.export.merge import merge_model

    source = sources["llama-bpe"]
    merged = merge_model(source.base, source.adapter, tokenizer_dir=source.tokenizer_dir, template=source.template)
    folder = write_hf(merged, tmp_path / "hf", max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file() and len(list(folder.glob("model-*.safetensors"))) > 1
    report = verify_export(source, Written(folder, "float32", lambda: HFRuntime(folder)))
    assert report.passed, report.failures


def test_quantized_base_is_dequantized_before_merging(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    import torch

    from tunelab.convert import convert_checkpoint
    from tunelab.export.merge import merge_model

    source = sources["qwen2-bpe"]
    convert_checkpoint(str(source.base), tmp_path / "q8", to="mlx", bits=8, group_size=32)
    quantized = ExportSource(tmp_path / "q8", source.adapter, source.tokenizer_dir, source.template)
    result = export_model(quantized, "hf", tmp_path / "hf")
    assert any("8-bit MLX-quantized: dequantized it to float32 before merging" in n for n in result.notes)
    assert result.report is not None and result.report["passed"]
    exact = merge_model(source.base, source.adapter, tokenizer_dir=source.tokenizer_dir, template=None).model
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        want, got = exact(input_ids=ids).logits, HFRuntime(result.path).model(input_ids=ids).logits
    assert float((want - got).abs().max()) < 0.05 * float(want.abs().max())  # 8-bit rounding, not a lost fine-tune
