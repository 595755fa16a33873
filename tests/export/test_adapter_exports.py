"""The run's LoRA adapter on its own: llama.cpp's LoRA GGUF, and an Ollama Modelfile with FROM + ADAPTER.

llama.cpp really loads the base GGUF with the adapter applied; its logits must
match the merged model's, and differ from the base's alone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tunelab.errors import ModelError, StateError
from tunelab.export.gguf import write_gguf
from tunelab.export.gguf_runtime import GGUFRuntime
from tunelab.export.ollama import jinja_render, render_modelfile
from tunelab.export.pipeline import ExportSource, export_model
from tunelab.export.verify import CONVERSATION

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/test.sh (the export extra)")


@pytest.mark.parametrize("name", ["llama-bpe", "qwen2-bpe"])  # Llama: q/k rows of B permuted like the base's
def test_gguf_adapter_applied_by_llama_cpp_matches_the_merged_model(
    name: str, sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    from gguf import GGUFReader

    source = sources[name]
    result = export_model(source, "gguf-adapter", tmp_path / "adapter.gguf", quantize="f32")
    report = result.report
    assert report is not None and report["passed"], report
    assert report["precision"] == "float32" and report["greedy_agreement"] == 1.0
    assert not [p for p in tmp_path.iterdir() if p.name != "adapter.gguf"]  # the staged base GGUF is gone

    reader = GGUFReader(result.path)
    meta = {k: reader.fields[k].contents() for k in ("general.type", "adapter.type", "adapter.lora.alpha")}
    assert meta == {"general.type": "adapter", "adapter.type": "lora", "adapter.lora.alpha": 8.0}
    names = {t.name for t in reader.tensors}
    assert {"blk.0.attn_q.weight.lora_a", "blk.0.attn_q.weight.lora_b", "blk.1.ffn_down.weight.lora_b"} <= names

    # Without the adapter llama.cpp computes the base model: the adapter is what closes the gap.
    write_gguf(source.base, tmp_path / "base.gguf", quant="f32")
    ids = GGUFRuntime(tmp_path / "base.gguf").tokenize(CONVERSATION[1]["content"], add_special=True)
    plain = GGUFRuntime(tmp_path / "base.gguf").logits(ids)
    adapted = GGUFRuntime(tmp_path / "base.gguf", lora=result.path).logits(ids)
    gap = float(np.max(np.abs(adapted - plain)))
    assert gap > 20 * report["max_logit_diff"], (gap, report["max_logit_diff"])


def test_f16_adapter_is_the_default_and_verified(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    result = export_model(sources["qwen2-bpe"], "gguf-adapter", tmp_path / "adapter.gguf")
    assert result.report is not None and result.report["passed"], result.report
    assert result.precision == "float16"
    assert {t.tensor_type.name for t in __import__("gguf").GGUFReader(result.path).tensors} == {"F16"}


def test_ollama_adapter_only_modelfile_names_the_base_and_renders_the_training_template(
    sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    from dataclasses import replace

    from transformers import AutoTokenizer

    source = replace(sources["qwen2-bpe"], from_ref="my-base:latest")
    result = export_model(source, "ollama-adapter", tmp_path / "ollama")
    assert result.report is not None and result.report["passed"] and result.report["template_match"], result.report
    assert sorted(p.name for p in result.path.iterdir()) == ["Modelfile", "adapter.gguf"]
    text = (result.path / "Modelfile").read_text()
    assert text.startswith('FROM my-base:latest\nADAPTER ./adapter.gguf\nTEMPLATE """')
    assert 'PARAMETER stop "<|im_end|>"' in text
    tokenizer = AutoTokenizer.from_pretrained(source.tokenizer_dir)
    want = jinja_render(tokenizer, source.template or "", CONVERSATION)
    assert render_modelfile(result.path / "Modelfile", CONVERSATION, tokenizer) == want

    # With no base named, the base is written beside the adapter so the folder works on its own.
    alone = export_model(sources["qwen2-bpe"], "ollama-adapter", tmp_path / "alone", check=False)
    assert (alone.path / "Modelfile").read_text().startswith("FROM ./base.gguf\nADAPTER ./adapter.gguf\n")
    assert GGUFRuntime(alone.path / "base.gguf", lora=alone.path / "adapter.gguf").tokenize("hi", add_special=False)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"use_dora": True}, "DoRA rescales every weight column"),
        ({"peft_type": "IA3"}, "IA3 rescales activations"),
        ({"use_rslora": False, "bias": "all"}, "trains biases"),
    ],
)
def test_adapters_llama_cpp_cannot_apply_are_refused_with_the_reason(
    change: dict[str, object], reason: str, sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    from dataclasses import replace

    source = sources["qwen2-bpe"]
    assert source.adapter is not None
    adapter = Path(shutil.copytree(source.adapter, tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, **change}))
    for target in ("gguf-adapter", "ollama-adapter"):
        with pytest.raises(ModelError, match=reason) as caught:
            export_model(replace(source, adapter=adapter), target, tmp_path / "out")
        assert "--to gguf" in (caught.value.hint or "")
    with pytest.raises(StateError, match="no adapter"):
        export_model(replace(source, adapter=None), "gguf-adapter", tmp_path / "full.gguf")


def test_rslora_scale_is_folded_into_b(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    """rsLoRA scales by alpha/sqrt(rank); the GGUF carries B pre-scaled and alpha 0, and still matches."""
    from dataclasses import replace

    source = sources["llama-bpe"]
    assert source.adapter is not None
    adapter = Path(shutil.copytree(source.adapter, tmp_path / "adapter"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    result = export_model(replace(source, adapter=adapter), "gguf-adapter", tmp_path / "a.gguf", quantize="f32")
    assert result.report is not None and result.report["passed"], result.report
    assert any("folded into lora_b" in n for n in result.notes)
