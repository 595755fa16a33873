"""`tunelab eval RUN --exports`: the run's held-out answers beside each export's, each in its own runtime."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from tests.conftest import run_cli

pytestmark = pytest.mark.slow


def test_exports_answer_as_the_run_does_and_a_broken_one_fails_with_exit_8(
    trained: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("llama_cpp")
    pytest.importorskip("onnxruntime")
    from tunelab import services

    home, run_id = trained
    written_exports = (("hf", None, "hf"), ("onnx", None, "onnx"), ("gguf", "f32", "m32.gguf"),
                       ("gguf", "q8_0", "m8.gguf"), ("gguf", "q4_0", "m4.gguf"))  # fmt: skip
    # Written, verified and recorded on the run as `tunelab export` does it (services.export_run), in this process:
    # five CLI starts less. The CLI's own export path is tests/export's and test_export_eval_cli's part.
    monkeypatch.setenv("TUNELAB_HOME", str(home))
    for target, quantize, out in written_exports:
        written = services.export_run(run_id, to=target, out=tmp_path / out, quantize=quantize)
        assert written.path == tmp_path / out and written.report is not None, written  # verified

    done = run_cli("eval", run_id, "--exports", "--max-new-tokens", "8", "--max-drop", "0.5", "--json", home=home)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {row["target"]: row for row in json.loads(done.stdout)["rows"]}
    lossless = ("hf float32", "onnx float32", "gguf float32")
    assert set(rows) == {"reference", *lossless, "gguf q8_0", "gguf q4_0"}, set(rows)
    assert rows["reference"]["scores"]["exact_match"] >= 0.9
    for name in lossless:
        assert rows[name]["agreement"] == 1.0, rows[name]
        assert rows[name]["perplexity_ratio"] == pytest.approx(1.0, abs=1e-3), rows[name]
    for quantised in ("gguf q8_0", "gguf q4_0"):  # real 8- and 4-bit files: their drop is measured, not assumed
        assert rows[quantised]["perplexity_ratio"] != 1.0, rows[quantised]
        assert rows[quantised]["scores"]["exact_match"] >= rows["reference"]["scores"]["exact_match"] - 0.5
    # 4 bits move the answers' loss further from the reference's than 8 bits do.
    assert abs(math.log(rows["gguf q4_0"]["perplexity_ratio"])) > abs(math.log(rows["gguf q8_0"]["perplexity_ratio"]))

    weights = tmp_path / "hf" / "model.safetensors"  # a tensor corrupted after the export was verified
    tensors = load_file(str(weights))
    name = next(k for k in tensors if k.endswith("lm_head.weight") or k.endswith("embed_tokens.weight"))
    tensors[name] = np.random.default_rng(0).standard_normal(tensors[name].shape).astype(tensors[name].dtype)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    broken = run_cli("eval", run_id, "--exports", "--max-new-tokens", "8", "--max-drop", "0.05", home=home)
    assert broken.returncode == 8, broken.stderr[-2000:]
    assert f"hf float32 ({tmp_path / 'hf'})" in broken.stderr and "Traceback" not in broken.stderr
