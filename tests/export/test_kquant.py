"""K-quant GGUF exports through llama.cpp's own quantizer, read back with the gguf reader and run in llama.cpp.

The model is a tiny fully fine-tuned Llama whose rows (256, 512) are multiples of the
K-quant block, so every matrix can take the requested type; a hidden-64 model
shows the fallback llama.cpp makes and the notes that report it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.export.conftest import greedy, held_out, perplexity

from tunelab.export.gguf_kquant import KQUANTS, is_k_type, quantize_file, tensor_types
from tunelab.export.gguf_runtime import GGUFRuntime
from tunelab.export.pipeline import ExportSource, export_model

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/test.sh (the export extra)")

# Perplexity on held-out chats may rise at most this much over the f16 export's (llama.cpp's own tables for
# 7B models: q6_k +0.1%, q5_k_m +0.3%, q4_k_m +0.9%, q3_k_m +4%, q2_k +11%; doubled here for a tiny model).
PPL_DRIFT = {"q6_k": 0.01, "q5_k_s": 0.02, "q5_k_m": 0.02, "q4_k_s": 0.03, "q4_k_m": 0.03, "q3_k_m": 0.08, "q2_k": 0.2}


def test_every_k_quant_has_its_types_loads_and_stays_near_f16(
    wide: ExportSource, chat_data: Path, tmp_path: Path
) -> None:
    f16 = export_model(wide, "gguf", tmp_path / "f16.gguf", quantize="f16", check=False).path
    chats = held_out(wide, chat_data)
    base_ppl = perplexity(f16, chats)
    for quant, (_, main) in KQUANTS.items():
        out = tmp_path / f"{quant}.gguf"
        notes = quantize_file(f16, out, quant)
        types = {name: kind for name, (kind, shape) in tensor_types(out).items() if len(shape) == 2}
        assert sum(kind == main for kind in types.values()) >= len(types) // 2, (quant, types)
        assert all(is_k_type(kind) for kind in types.values()), (quant, types)  # no fallback: rows fit
        assert not any("fell back" in n for n in notes) and notes[0].startswith(f"{quant}: most matrices are {main}")
        drift = perplexity(out, chats) / base_ppl - 1
        print(f"{quant}: perplexity {base_ppl:.4f} (f16) -> {base_ppl * (1 + drift):.4f} ({drift:+.2%})")
        assert abs(drift) <= PPL_DRIFT[quant], (quant, base_ppl, drift)
        if quant in ("q6_k", "q5_k_m", "q4_k_m"):  # greedy text from a chat prompt, as llama.cpp generates it
            prompt = chats[0][0][: chats[0][1]]
            assert greedy(out, prompt) == greedy(f16, prompt), quant


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
