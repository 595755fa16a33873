"""GGUF and Ollama exports, loaded and run by llama.cpp (llama-cpp-python) and checked against the merged model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tunelab.errors import ModelError
from tunelab.export.gguf_runtime import GGUFRuntime
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
    [
        ("qwen2-bpe", "f32"),
        ("llama-bpe", "f16"),
        ("qwen2-bpe", "bf16"),
        ("llama-bpe", "q8_0"),
        ("qwen2-bpe", "q4_0"),
        ("llama-sp-legacy", "f16"),
    ],
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
    if name == "llama-sp-legacy":  # SentencePiece: a "▁" before every run of text, as transformers' legacy mode
        assert meta["tokenizer.ggml.model"] == "llama" and meta["tokenizer.ggml.add_space_prefix"] == "true"
    else:  # transformers gives Qwen2 tokenizers Qwen's split regex; Llama keeps the trained (Llama 3) one.
        assert meta["tokenizer.ggml.pre"] == {"qwen2-bpe": "qwen2", "llama-bpe": "llama-bpe"}[name]
    assert int(meta["tokenizer.ggml.eot_token_id"]) == runtime.tokenize("<|im_end|>", add_special=False)[0]


def test_sentencepiece_gguf_mismatch_is_refused_with_a_reason(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    """transformers' non-legacy flavour prefixes only the start of the text; llama.cpp can't do that."""
    with pytest.raises(ModelError, match=r"llama\.cpp does both or neither") as caught:
        export_model(sources["llama-sp"], "gguf", tmp_path / "model.gguf")
    assert '"legacy": true' in (caught.value.hint or "")


def test_sentencepiece_without_dummy_prefix_writes_no_space_prefix(chat_data: Path, tmp_path: Path) -> None:
    """Gemma-style: no "▁" anywhere is the other setting llama.cpp reproduces (add_space_prefix = false)."""
    import json

    from gguf import GGUFReader

    source = _tiny(chat_data, tmp_path / "sp", "llama", tokenizer="sentencepiece")
    config_file = source.tokenizer_dir / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "add_prefix_space": False}))
    result = export_model(source, "gguf", tmp_path / "model.gguf", quantize="f32")
    assert result.report is not None and result.report["passed"], result.report
    field = GGUFReader(result.path).fields["tokenizer.ggml.add_space_prefix"]
    assert field.contents() is False


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


@pytest.mark.parametrize("name", ["qwen2-bpe", "llama-sp-legacy"])
def test_ollama_modelfile_matches_training_template(
    name: str, sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    result = export_model(sources[name], "ollama", tmp_path / "ollama", quantize="q8_0")
    assert result.report is not None and result.report["passed"], result.report
    text = (result.path / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(sources[name].tokenizer_dir)
    want = jinja_render(tokenizer, sources[name].template or "", CONVERSATION)
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


# Per family: tiny-model settings llama.cpp computes the same way (Gemma's graph ties the output layer and
# scales queries by the head size; Gemma 3's second layer is made a full-attention one, with its own rope base).
FAMILY_SETTINGS: dict[str, dict[str, object]] = {
    "mistral": {},
    "qwen3": {},
    "phi3": {},
    "gemma": {"tie_word_embeddings": True},
    "gemma2": {"tie_word_embeddings": True, "query_pre_attn_scalar": 16},
    "gemma3": {
        "tie_word_embeddings": True,
        "query_pre_attn_scalar": 16,
        "layer_types": ["sliding_attention", "full_attention"],
    },
}


def _tiny(chat_data: Path, out: Path, arch: str, **settings: object) -> ExportSource:
    """A whole tiny model (as of a full fine-tune); ``settings`` not taken by the builder go into config.json."""
    import json

    from tests.integration.conftest import tiny_model_from

    from tunelab.hub import load_tokenizer

    config_keys = ("query_pre_attn_scalar", "rope_parameters", "layer_types")
    config_only = {k: settings.pop(k) for k in config_keys if k in settings}
    base = tiny_model_from(chat_data, out, arch=arch, hidden_size=64, num_heads=4, **settings)
    if config_only:
        config = json.loads((base / "config.json").read_text())
        (base / "config.json").write_text(json.dumps({**config, **config_only}))
    return ExportSource(base, None, base, load_tokenizer(base).chat_template)


@pytest.mark.parametrize("arch", list(FAMILY_SETTINGS))
def test_gguf_other_families(arch: str, chat_data: Path, tmp_path: Path) -> None:
    """Each family llama.cpp runs, exported whole and checked logit by logit."""
    source = _tiny(chat_data, tmp_path / arch, arch, **FAMILY_SETTINGS[arch])
    result = export_model(source, "gguf", tmp_path / "model.gguf", quantize="f32")
    assert result.report is not None and result.report["passed"], result.report
    assert result.report["greedy_agreement"] == 1.0


def test_gguf_refuses_what_llama_cpp_would_compute_differently(chat_data: Path, tmp_path: Path) -> None:
    source = _tiny(chat_data, tmp_path / "gemma", "gemma")
    with pytest.raises(ModelError, match="own lm_head"):
        export_model(source, "gguf", tmp_path / "model.gguf")
    # transformers' Gemma 2 default scales queries by 1/sqrt(256), llama.cpp by 1/sqrt(head size) (16 here).
    source = _tiny(chat_data, tmp_path / "gemma2", "gemma2", tie_word_embeddings=True)
    with pytest.raises(ModelError, match="query_pre_attn_scalar=256"):
        export_model(source, "gguf", tmp_path / "gemma2.gguf")


def test_phi3_name_trips_llama_cpp_fixup_only_for_a_tokenizer_that_needs_it(
    sources: dict[str, ExportSource],
) -> None:
    """llama.cpp makes every special token of a model *named* Phi-3 strip the whitespace after it."""
    from tokenizers import AddedToken

    from tunelab.export.gguf import model_name
    from tunelab.hub import load_tokenizer

    config = {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3"}
    tokenizer = load_tokenizer(sources["qwen2-bpe"].tokenizer_dir)
    assert "phi3" not in model_name(config, tokenizer).lower()  # keeps "<|im_end|>\n" as training saw it
    tokenizer.add_special_tokens({"additional_special_tokens": [AddedToken("<|end|>", rstrip=True, special=True)]})
    with pytest.raises(ModelError, match=r"needs the tokens </s>, <s>, <unk>"):
        model_name(config, tokenizer)  # Phi-3-like stripping, but without the tokens llama.cpp looks up


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Small, so a tiny head's wavelengths fall on all three sides of the scaled band.
    "original_max_position_embeddings": 64,
}


def test_llama3_rope_factors_match_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from tunelab.export.gguf_rope import llama3_factors

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=LLAMA3_ROPE)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    unscaled = 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16)
    factors = llama3_factors(config.to_dict(), 16)
    assert factors is not None and {1.0, 8.0} < set(factors.round(6).tolist())  # unscaled, scaled and blended
    np.testing.assert_allclose(unscaled / scaled.numpy(), factors, rtol=1e-5)


def test_gguf_llama3_rope_scaling_round_trip(chat_data: Path, tmp_path: Path) -> None:
    source = _tiny(chat_data, tmp_path / "llama", "llama", rope_parameters=LLAMA3_ROPE)
    result = export_model(source, "gguf", tmp_path / "model.gguf", quantize="f32")
    assert result.report is not None and result.report["passed"], result.report
    from gguf import GGUFReader

    assert "rope_freqs.weight" in {t.name for t in GGUFReader(result.path).tensors}
