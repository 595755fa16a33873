"""GGUF and Ollama exports, loaded and run by llama.cpp (llama-cpp-python) and checked against the merged model."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.errors import ModelError
from tunelab.export.gguf import GGUFRuntime
from tunelab.export.ollama import FORMATS, jinja_render, match_format, render_go, render_modelfile
from tunelab.export.pipeline import ExportSource, Written, export_model, verify_export
from tunelab.export.verify import CONVERSATION

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/test.sh (the export extra)")

LLAMA3 = (
    "{{- bos_token }}{%- for message in messages %}{{- '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.mark.parametrize(
    ("name", "quant"),
    [("qwen2-bpe", "f32"), ("llama-bpe", "f16"), ("qwen2-bpe", "bf16"), ("llama-bpe", "q8_0"), ("qwen2-bpe", "q4_0")],
)
def test_gguf_round_trip_through_llama_cpp(
    name: str, quant: str, sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    result = export_model(sources[name], "gguf", tmp_path / "model.gguf", quantize=quant)
    report = result.report
    assert report is not None and report["passed"], report
    assert report["tokenization_match"] and report["template_match"]
    if quant in ("f32", "f16"):
        assert report["greedy_agreement"] == 1.0
    runtime = GGUFRuntime(result.path)
    assert runtime.chat_template() == sources[name].template
    meta = runtime.llm.metadata
    # transformers gives Qwen2 tokenizers Qwen's split regex; the Llama one keeps the trained (Llama 3) regex.
    assert meta["tokenizer.ggml.pre"] == {"qwen2-bpe": "qwen2", "llama-bpe": "llama-bpe"}[name]
    assert int(meta["tokenizer.ggml.eot_token_id"]) == runtime.tokenize("<|im_end|>", add_special=False)[0]


def test_sentencepiece_gguf_mismatch_is_refused_with_a_reason(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"llama\.cpp always does"):
        export_model(sources["llama-sp"], "gguf", tmp_path / "model.gguf")


def test_corrupt_gguf_template_is_caught(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    from tunelab.export.gguf import write_gguf

    source = sources["qwen2-bpe"]
    folder = export_model(source, "hf", tmp_path / "hf", check=False).path
    template = (source.template or "").replace("'\\n' + (message", "(message")  # role and content run together
    assert template != source.template
    write_gguf(folder, tmp_path / "broken.gguf", quant="f32", template=template)
    written = Written(tmp_path / "broken.gguf", "float32", lambda: GGUFRuntime(tmp_path / "broken.gguf"))
    report = verify_export(source, written)
    assert report.template_match is False and not report.passed
    assert report.tokenization_match and report.greedy_agreement == 1.0  # only the template is wrong


def test_ollama_modelfile_matches_training_template(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    result = export_model(sources["qwen2-bpe"], "ollama", tmp_path / "ollama", quantize="q8_0")
    assert result.report is not None and result.report["passed"], result.report
    text = (result.path / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sources["qwen2-bpe"].tokenizer_dir)
    want = jinja_render(tokenizer, sources["qwen2-bpe"].template or "", CONVERSATION)
    assert render_modelfile(result.path / "Modelfile", CONVERSATION, tokenizer) == want


def test_llama3_template_has_an_exact_go_equivalent(sources: dict[str, ExportSource]) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sources["qwen2-bpe"].tokenizer_dir)
    tokenizer.bos_token = "<|begin_of_text|>"
    fmt = match_format(tokenizer, LLAMA3)
    assert fmt.name == "llama3" and "<|eot_id|>" in fmt.stops
    go = "<|begin_of_text|>" + render_go(fmt.template, {"Messages": list(CONVERSATION)})
    assert go == jinja_render(tokenizer, LLAMA3, CONVERSATION)
    with pytest.raises(ModelError, match="matches none"):
        match_format(tokenizer, LLAMA3.replace("\\n\\n", "\\n"))
    assert {f.name for f in FORMATS} >= {"chatml", "llama3"}


def test_go_template_interpreter() -> None:
    template = (
        "{{- if .System }}S:{{ .System }}\n{{ end }}"
        '{{ range .Messages }}{{ if eq .Role "user" }}U{{ else }}A{{ end }}:{{ .Content }} {{- end }}'
    )
    data = {"System": "sys", "Messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    assert render_go(template, data) == "S:sys\nU:hiA:yo"


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma"])
def test_gguf_other_families(arch: str, chat_data: Path, tmp_path: Path) -> None:
    """Whole-model exports (as of a full fine-tune) of the other families llama.cpp runs."""
    from tests.integration.conftest import tiny_model_from

    from tunelab.hub import load_tokenizer

    extra = {"tie_word_embeddings": True} if arch == "gemma" else {}  # llama.cpp's Gemma has no separate lm_head
    base = tiny_model_from(chat_data, tmp_path / arch, arch=arch, hidden_size=64, num_heads=4, **extra)
    source = ExportSource(base, None, base, load_tokenizer(base).chat_template)
    result = export_model(source, "gguf", tmp_path / "model.gguf", quantize="f32")
    assert result.report is not None and result.report["passed"], result.report
    assert result.report["greedy_agreement"] == 1.0


def test_gguf_refuses_what_llama_cpp_would_compute_differently(chat_data: Path, tmp_path: Path) -> None:
    from tests.integration.conftest import tiny_model_from

    from tunelab.hub import load_tokenizer

    base = tiny_model_from(chat_data, tmp_path / "gemma", arch="gemma", hidden_size=64, num_heads=4)
    source = ExportSource(base, None, base, load_tokenizer(base).chat_template)
    with pytest.raises(ModelError, match="own lm_head"):
        export_model(source, "gguf", tmp_path / "model.gguf")
    phi = tiny_model_from(chat_data, tmp_path / "phi3", arch="phi3", hidden_size=64, num_heads=4)
    with pytest.raises(ModelError, match="does not support model_type 'phi3'"):
        export_model(ExportSource(phi, None, phi, None), "gguf", tmp_path / "phi.gguf")
