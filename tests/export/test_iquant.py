"""i-quant GGUF exports and importance matrices, through llama.cpp's own quantizer.

The model is the fully fine-tuned hidden-256 Llama of the K-quant tests (its rows fit the
256-weight blocks).  The importance matrix is collected from the training chats and
perplexity is measured on held-out ones, so "the matrix helps" is not measured on the
data it was made from.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from tests.conftest import run_cli
from tests.export.conftest import held_out, perplexity

from tunelab.errors import ConfigError, ModelError
from tunelab.export import imatrix as importance
from tunelab.export.gguf_kquant import IQUANTS, NEED_IMATRIX, is_i_type, is_k_type, quantize_file, tensor_types
from tunelab.export.gguf_runtime import GGUFRuntime
from tunelab.export.merge import merge_model
from tunelab.export.pipeline import I_QUANTS, ExportSource, check_options, export_model
from tunelab.export.pipeline import NEED_IMATRIX as PIPELINE_NEED

pytest.importorskip("llama_cpp", reason="llama-cpp-python is installed by scripts/test.sh (the export extra)")

# Perplexity on held-out chats may rise at most this much over the f16 export's (measured on this model:
# +0.1% to +0.9%; llama.cpp's own tables for 7B models go from ~+1% at iq4_xs to ~+50% at iq1_s).
# iq3_s, iq3_m and iq2_m are measured by the tests below.
PPL_DRIFT = {"iq4_xs": 0.02, "iq3_xxs": 0.06, "iq2_xxs": 0.15, "iq1_s": 0.3}


@pytest.fixture(scope="module")
def matrix(wide: ExportSource, chat_data: Path) -> importance.Imatrix:
    """The importance matrix of the wide model, collected from its training chats."""
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(wide.tokenizer_dir)
    lines = (chat_data / "train.jsonl").read_text().splitlines()
    chats = [tokenizer.apply_chat_template(json.loads(x)["messages"], tokenize=True, return_dict=False) for x in lines]
    merged = merge_model(wide.base, None, tokenizer_dir=wide.tokenizer_dir, template=wide.template)
    return importance.collect(merged.model, merged.model.config.to_dict(), importance.calibration_from(chats, "train"))


@pytest.fixture(scope="module")
def f16(wide: ExportSource, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model(wide, "gguf", tmp_path_factory.mktemp("iq") / "f16.gguf", quantize="f16", check=False).path


def test_the_matrix_covers_every_block_matrix_and_survives_llama_cpp_s_file_layouts(
    matrix: importance.Imatrix, f16: Path, tmp_path: Path
) -> None:
    assert len(matrix.sums) == 14 and matrix.tokens > 5000 and matrix.chunk_size == 512  # 2 blocks x 7 matrices
    assert matrix.sums["blk.0.attn_q.weight"].shape == (256,) and matrix.sums["blk.1.ffn_down.weight"].shape == (512,)
    # q, k and v read the same normed input, so their columns' sums are equal
    assert np.allclose(matrix.sums["blk.0.attn_q.weight"], matrix.sums["blk.0.attn_v.weight"])
    back = importance.read(importance.write(matrix, tmp_path / "m.imatrix.gguf"))
    assert back.counts == matrix.counts and back.datasets == ["train"]
    assert all(np.allclose(back.means()[k], v, rtol=1e-6) for k, v in matrix.means().items())
    # llama-imatrix's older .dat layout: n, then (name, ncall, values = mean * ncall) per entry
    dat = tmp_path / "m.dat"
    means = matrix.means()
    body = b"".join(struct.pack(f"<i{len(k)}sii", len(k), k.encode(), 10, v.size) + (v * 10).astype("<f4").tobytes()
                    for k, v in means.items())  # fmt: skip
    dat.write_bytes(struct.pack("<i", len(means)) + body)
    assert all(np.allclose(importance.read(dat).means()[k], v, rtol=1e-6) for k, v in means.items())
    [note] = importance.check_against(back, tensor_types(f16))
    assert "14 of 14 block matrices" in note


def test_i_quants_have_their_types_load_in_llama_cpp_and_stay_near_f16(
    matrix: importance.Imatrix, f16: Path, wide: ExportSource, chat_data: Path, tmp_path: Path
) -> None:
    chats = held_out(wide, chat_data)
    base = perplexity(f16, chats)
    for quant, bound in PPL_DRIFT.items():
        out = tmp_path / f"{quant}.gguf"
        notes = quantize_file(f16, out, quant, imatrix=matrix.means())
        main = IQUANTS[quant][1]
        kinds = [kind for _name, (kind, shape) in tensor_types(out).items() if len(shape) == 2]
        assert main in kinds and all(is_i_type(k) or is_k_type(k) for k in kinds), (quant, kinds)  # no fallback
        count = sum(k == main for k in kinds)  # a 2-block model gets llama.cpp's mix for first/last layers
        share = "most matrices are" if 2 * count >= len(kinds) else f"{count} of {len(kinds)} matrices are"
        assert notes[0] == f"{quant}: {share} {main} (llama.cpp's quantizer)", notes
        drift = perplexity(out, chats) / base - 1  # perplexity() loads the file in llama.cpp
        print(
            f"{quant}: perplexity {base:.4f} (f16) -> {base * (1 + drift):.4f} ({drift:+.2%}), {out.stat().st_size:,} B"
        )
        assert abs(drift) <= bound, (quant, base, drift)


def test_the_importance_matrix_lowers_perplexity_at_the_same_type(
    matrix: importance.Imatrix, f16: Path, wide: ExportSource, chat_data: Path, tmp_path: Path
) -> None:
    chats = held_out(wide, chat_data)
    base = perplexity(f16, chats)
    for quant in ("iq3_s", "iq3_m"):
        drift = {}
        for label, means in (("with", matrix.means()), ("without", None)):
            out = tmp_path / f"{quant}-{label}.gguf"
            quantize_file(f16, out, quant, imatrix=means)
            drift[label] = perplexity(out, chats) / base - 1
        print(f"{quant}: perplexity vs f16 {drift['with']:+.2%} with the imatrix, {drift['without']:+.2%} without")
        assert drift["with"] < drift["without"], (quant, drift)
    with pytest.raises(ModelError, match="needs an importance matrix"):
        quantize_file(f16, tmp_path / "no.gguf", "iq2_xxs")


def test_an_i_quant_export_collects_saves_and_reuses_its_matrix(
    wide: ExportSource, chat_data: Path, tmp_path: Path
) -> None:
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(wide.tokenizer_dir)
    lines = (chat_data / "valid.jsonl").read_text().splitlines()
    chats = [tokenizer.apply_chat_template(json.loads(x)["messages"], tokenize=True, return_dict=False) for x in lines]
    calibration = importance.calibration_from(chats, "valid.jsonl")
    result = export_model(wide, "gguf", tmp_path / "model.gguf", quantize="iq3_m", imatrix=calibration)
    assert result.report is not None and result.report["passed"] and result.precision == "iq3_m", result.report
    saved = tmp_path / "model.imatrix.gguf"
    assert saved.is_file() and any(f"saved as {saved}" in n and "14 of 14" in n for n in result.notes)
    assert GGUFRuntime(result.path).llm.metadata["general.file_type"] == "27"  # LLAMA_FTYPE_MOSTLY_IQ3_M
    again = export_model(wide, "gguf", tmp_path / "iq2.gguf", quantize="iq2_m", imatrix=saved)
    assert again.report is not None and again.report["passed"], again.report
    assert any(n.startswith(f"importance matrix from {saved}") for n in again.notes)
    print(f"iq3_m verified: {result.report['relative_logit_diff']:.1%} / {result.report['greedy_agreement']:.0%}; "
          f"iq2_m: {again.report['relative_logit_diff']:.1%} / {again.report['greedy_agreement']:.0%}")  # fmt: skip


def test_importance_matrix_mistakes_are_refused_clearly(tmp_path: Path) -> None:
    assert tuple(IQUANTS) == I_QUANTS and PIPELINE_NEED == NEED_IMATRIX
    with pytest.raises(ConfigError, match="K- and i-quants only"):
        check_options("gguf", "q8_0", "auto")
    with pytest.raises(ConfigError, match="needs an importance matrix"):
        check_options("ollama", "iq2_xs", None)
    junk = tmp_path / "junk.dat"
    junk.write_bytes(b"\x01\x00\x00\x00\xff\xff")
    with pytest.raises(ConfigError, match="not an importance matrix"):
        importance.read(junk)
    other = importance.Imatrix(sums={"blk.0.attn_q.weight": np.ones(64)}, counts={"blk.0.attn_q.weight": 3})
    with pytest.raises(ConfigError, match=r"has 64 columns for blk\.0\.attn_q\.weight, which has 256 here"):
        importance.check_against(other, {"blk.0.attn_q.weight": ("F16", (256, 256))})
    for args, says in [
        (("--to", "gguf", "--quantize", "q8_0", "--imatrix", "auto"), "K- and i-quants only"),
        (("--to", "gguf", "--quantize", "iq2_xxs"), "--imatrix auto"),
        (("--to", "hf", "--imatrix", "auto"), "K- and i-quants only"),
    ]:
        bad = run_cli("export", "nope", *args, "--out", tmp_path / "y")
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


@pytest.mark.slow
def test_cli_imatrix_auto_collects_from_the_run_s_held_out_chats(lora_run: tuple[Path, str], tmp_path: Path) -> None:
    home, run_id = lora_run
    out = tmp_path / "model.gguf"
    done = run_cli("export", run_id, "--to", "gguf", "--quantize", "q4_k_m", "--imatrix", "auto", "--out", out,
                   "--json", home=home, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    notes = json.loads(done.stdout)["notes"]
    saved = tmp_path / "model.imatrix.gguf"
    assert any(n.startswith("importance matrix from valid.jsonl") and str(saved) in n for n in notes), notes
    assert importance.read(saved).datasets == ["valid.jsonl"]
    reused = run_cli("export", run_id, "--to", "ollama", "--quantize", "iq4_xs", "--imatrix", saved, "--out",
                     tmp_path / "ollama", "--json", home=home, timeout=600)  # fmt: skip
    assert reused.returncode == 0, reused.stderr[-2000:]
    missing = run_cli("export", run_id, "--to", "gguf", "--quantize", "iq2_m", "--imatrix", tmp_path / "nope.gguf",
                      "--out", tmp_path / "x.gguf", home=home)  # fmt: skip
    assert missing.returncode == 2 and "no such file" in missing.stderr and "Traceback" not in missing.stderr
