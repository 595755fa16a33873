"""K-quant GGUF exports through llama.cpp's own quantizer, read back with the gguf reader and run in llama.cpp.

The model is a tiny fully fine-tuned Llama whose rows (256, 512) are multiples of the
K-quant block, so every matrix can take the requested type; a hidden-64 model
shows the fallback llama.cpp makes and the notes that report it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tests.integration.conftest import base_config, tiny_model_from

from tunelab.export.gguf_kquant import KQUANTS, is_k_type, quantize_file, tensor_types
from tunelab.export.gguf_runtime import GGUFRuntime
from tunelab.export.pipeline import ExportSource, export_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/test.sh (the export extra)")

# Perplexity on held-out chats may rise at most this much over the f16 export's (llama.cpp's own tables for
# 7B models: q6_k +0.1%, q5_k_m +0.3%, q4_k_m +0.9%, q3_k_m +4%, q2_k +11%; doubled here for a tiny model).
PPL_DRIFT = {"q6_k": 0.01, "q5_k_s": 0.02, "q5_k_m": 0.02, "q4_k_s": 0.03, "q4_k_m": 0.03, "q3_k_m": 0.08, "q2_k": 0.2}


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory, chat_data: Path) -> ExportSource:
    """A Llama with hidden 256 and intermediate 512 (K-quant rows), fully fine-tuned until it has learned the chats.

    Trained (val perplexity ~3.5 after 20 steps), so perplexity drift means something: a random model's
    near-flat logits make any quantization look harmless or harmful by chance.
    """
    from tunelab import services
    from tunelab.config.load import load_config
    from tunelab.hub import load_tokenizer

    root = tmp_path_factory.mktemp("kquant")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUNELAB_HOME", str(root / "home"))
        base = tiny_model_from(
            chat_data, root / "base", arch="llama", tokenizer="bpe", hidden_size=256, num_heads=4, intermediate_size=512
        )
        raw = base_config(base, chat_data, root / "run", steps=20, lr=2e-3)
        raw["method"] = {"name": "full"}
        assert services.start_run(load_config(raw)).status == "completed"
    model = root / "run" / "model"
    return ExportSource(model, None, model, load_tokenizer(model).chat_template)


def _perplexity(path: Path, chats: list[tuple[list[int], int]]) -> float:
    """Perplexity of the assistant replies (what training taught; the prompts are random words)."""
    runtime = GGUFRuntime(path)
    nll, count = 0.0, 0
    for ids, start in chats:
        logits = runtime.logits(ids).astype(np.float64)[start - 1 : -1]
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(logp)), ids[start:]].sum())
        count += len(logp)
    return float(np.exp(nll / count))


def _held_out(source: ExportSource, chat_data: Path) -> list[tuple[list[int], int]]:
    """(token ids of a held-out chat, where its last reply starts), for 12 validation chats."""
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(source.tokenizer_dir)
    out = []
    for line in (chat_data / "valid.jsonl").read_text().splitlines()[:12]:
        messages = json.loads(line)["messages"]
        ids = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        prompt = tokenizer.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False
        )
        out.append((list(ids), len(prompt)))
    return out


def test_every_k_quant_has_its_types_loads_and_stays_near_f16(
    wide: ExportSource, chat_data: Path, tmp_path: Path
) -> None:
    f16 = export_model(wide, "gguf", tmp_path / "f16.gguf", quantize="f16", check=False).path
    chats = _held_out(wide, chat_data)
    base_ppl = _perplexity(f16, chats)
    for quant, (_, main) in KQUANTS.items():
        out = tmp_path / f"{quant}.gguf"
        notes = quantize_file(f16, out, quant)
        types = {name: kind for name, (kind, shape) in tensor_types(out).items() if len(shape) == 2}
        assert sum(kind == main for kind in types.values()) >= len(types) // 2, (quant, types)
        assert all(is_k_type(kind) for kind in types.values()), (quant, types)  # no fallback: rows fit
        assert not any("fell back" in n for n in notes) and notes[0].startswith(f"{quant}: most matrices are {main}")
        drift = _perplexity(out, chats) / base_ppl - 1
        print(f"{quant}: perplexity {base_ppl:.4f} (f16) -> {base_ppl * (1 + drift):.4f} ({drift:+.2%})")
        assert abs(drift) <= PPL_DRIFT[quant], (quant, base_ppl, drift)
        if quant in ("q6_k", "q5_k_m", "q4_k_m"):  # greedy text from a chat prompt, as llama.cpp generates it
            prompt = chats[0][0][: chats[0][1]]
            assert _greedy(out, prompt) == _greedy(f16, prompt), quant


def _greedy(path: Path, prompt: list[int], steps: int = 8) -> list[int]:
    runtime = GGUFRuntime(path)
    seq = list(prompt)
    for _ in range(steps):
        seq.append(int(np.argmax(runtime.logits(seq)[-1])))
    return seq[len(prompt) :]


def test_k_quant_export_is_verified_against_the_merged_model(wide: ExportSource, tmp_path: Path) -> None:
    result = export_model(wide, "gguf", tmp_path / "model.gguf", quantize="q4_k_m")
    assert result.report is not None and result.report["passed"], result.report
    assert result.precision == "q4_k_m" and result.report["template_match"]
    assert any("most matrices are Q4_K" in n for n in result.notes)
    assert not list(tmp_path.glob(".*float.gguf"))  # the float GGUF it was quantized from is gone
    assert GGUFRuntime(result.path).llm.metadata["general.file_type"] == "15"  # LLAMA_FTYPE_MOSTLY_Q4_K_M


def test_rows_that_do_not_fit_a_k_block_fall_back_and_are_reported(
    sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    result = export_model(sources["qwen2-bpe"], "gguf", tmp_path / "model.gguf", quantize="q4_k_m")
    assert result.report is not None and result.report["passed"], result.report
    [note] = [n for n in result.notes if "fell back" in n]
    assert "rows of 64 are not a multiple of 256" in note
    kinds = {kind for _, (kind, shape) in tensor_types(result.path).items() if len(shape) == 2 and shape[0] == 64}
    assert kinds and not any(is_k_type(k) for k in kinds)
