"""The mlx, onnx and coreml targets, each loaded by its own runtime and checked against the merged model."""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import pytest

from tunelab.export.pipeline import ExportSource, Written, export_model, verify_export

NAMES = ["qwen2-bpe", "llama-sp", "llama-sp-legacy"]


@pytest.mark.parametrize(
    ("name", "bits"),
    [("qwen2-bpe", None), ("qwen2-bpe", "8"), ("qwen2-bpe", "4"), ("llama-sp", None), ("llama-sp", "4")],
)
def test_mlx_export_loads_in_mlx_lm(
    name: str, bits: str | None, sources: dict[str, ExportSource], tmp_path: Path
) -> None:
    pytest.importorskip("mlx_lm")
    result = export_model(sources[name], "mlx", tmp_path / "mlx", quantize=bits)
    report = result.report
    assert report is not None and report["passed"], report
    assert result.precision == (f"{bits}bit" if bits else "float32")
    if bits is None:
        assert report["max_logit_diff"] < 1e-4 and report["greedy_agreement"] == 1.0
    assert (result.path / "config.json").is_file() and report["template_match"]


def _config(folder: Path) -> object:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(folder))


@pytest.mark.parametrize("name", NAMES)
def test_onnx_export_runs_in_onnxruntime(name: str, sources: dict[str, ExportSource], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    result = export_model(sources[name], "onnx", tmp_path / "onnx")
    report = result.report
    assert report is not None and report["passed"], report
    assert report["max_logit_diff"] < 1e-4 and report["greedy_agreement"] == 1.0 and report["template_match"]
    import onnxruntime

    from tunelab.export.onnx import cache_shape

    session = onnxruntime.InferenceSession(str(result.path / "model.onnx"), providers=["CPUExecutionProvider"])
    layers, heads, head_dim = cache_shape(_config(result.path))
    empty = np.zeros((layers, 3, heads, 0, head_dim), dtype=np.float32)
    ids = np.array([[1, 2, 3], [4, 5, 6], [7, 8, 9]], dtype=np.int64)
    logits, keys, _ = session.run(None, {"input_ids": ids, "past_keys": empty, "past_values": empty})
    assert logits.shape[:2] == (3, 3) and keys.shape == (layers, 3, heads, 3, head_dim)  # batch, length, past dynamic


def test_corrupt_onnx_weight_fails_verification(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from tunelab.export.onnx import ONNXRuntime

    folder = export_model(sources["qwen2-bpe"], "onnx", tmp_path / "onnx", check=False).path
    model = onnx.load(str(folder / "model.onnx"))
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))  # the embedding or lm_head
    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init)[::-1].copy(), init.name))
    onnx.save(model, str(folder / "model.onnx"))
    report = verify_export(sources["qwen2-bpe"], Written(folder, "float32", lambda: ONNXRuntime(folder)))
    assert not report.passed and any("logits differ" in f for f in report.failures)


@pytest.mark.parametrize("name", NAMES)
def test_coreml_conversion_and_spec(name: str, sources: dict[str, ExportSource], tmp_path: Path) -> None:
    ct = pytest.importorskip("coremltools")
    result = export_model(sources[name], "coreml", tmp_path / "coreml")
    report = result.report
    assert report is not None and report["passed"], report
    assert report["tokenization_match"] and report["template_match"]
    spec = ct.utils.load_spec(str(result.path / "model.mlpackage"))
    assert spec.WhichOneof("Type") == "mlProgram"
    assert [i.name for i in spec.description.input] == ["input_ids", "position_ids", "causal_mask"]
    ranges = spec.description.input[0].type.multiArrayType.shapeRange.sizeRanges
    assert ranges[1].upperBound >= 512  # prompts of any length up to the limit, not one fixed shape
    if platform.system() != "Darwin":
        assert report["logits_skipped"] == "Core ML models run only on macOS"


@pytest.mark.macos
@pytest.mark.skipif(platform.system() != "Darwin", reason="Core ML runs models only on macOS")
def test_coreml_prediction_matches_merged_model(sources: dict[str, ExportSource], tmp_path: Path) -> None:
    result = export_model(sources["qwen2-bpe"], "coreml", tmp_path / "coreml")
    report = result.report
    assert report is not None and report["passed"] and report["logits_skipped"] is None
    assert report["greedy_agreement"] >= 0.97
