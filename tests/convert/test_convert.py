"""`tunelab convert`: HF checkpoints become mlx-lm folders and come back, loadable and numerically equal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunelab.convert import ConvertResult, convert_checkpoint
from tunelab.errors import ConfigError, ModelError

# Long enough that a wrong RoPE base shows in the logits.
IDS = [[5, 17, 42, 101, 7, 250, 33, 64, 12, 90, 3, 77, 150, 8, 21, 99]]
MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the weather today?"},
]


def _mlx_lm() -> Any:
    """mlx_lm, imported the way tunelab imports it (fast BLAS first on Linux)."""
    from tunelab.backends.mlx.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx_lm

    return mlx_lm


def _mlx_logits(folder: Path) -> tuple[np.ndarray, Any]:
    import mlx.core as mx

    model, tokenizer = _mlx_lm().load(str(folder))
    return np.array(model(mx.array(IDS)).astype(mx.float32)), tokenizer


def _hf_model(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def _hf_logits(model: Any) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def _chat_text(tokenizer: Any) -> str:
    return tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


@pytest.fixture(scope="module")
def qwen2_dir(tiny_corpus: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A qwen2 checkpoint: transformers 5 keeps its RoPE base only under rope_parameters."""
    from tunelab.tiny import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("qwen2") / "qwen2-bpe"
    return make_tiny_checkpoint(
        out, tiny_corpus, arch="qwen2", vocab_size=400, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1
    )


@pytest.fixture(scope="module")
def llama_mlx(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    return convert_checkpoint(str(tiny_model_dir), tmp_path_factory.mktemp("conv") / "llama-mlx", to="mlx")


@pytest.fixture(scope="module")
def llama_q4(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ConvertResult:
    # hidden_size 32: group size 32 is what lets every layer quantize.
    out = tmp_path_factory.mktemp("conv") / "llama-q4"
    return convert_checkpoint(str(tiny_model_dir), out, to="mlx", bits=4, group_size=32)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_hf_to_mlx_matches_transformers(
    arch: str, llama_mlx: ConvertResult, qwen2_dir: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    src = tiny_model_dir if arch == "llama" else qwen2_dir
    result = llama_mlx if arch == "llama" else convert_checkpoint(str(src), tmp_path / "mlx", to="mlx")
    assert (result.model_type, result.bits, result.dtype) == (arch, None, "float32")
    assert "quantization" not in json.loads((result.out / "config.json").read_text())

    logits, tokenizer = _mlx_logits(result.out)
    np.testing.assert_allclose(logits, _hf_logits(_hf_model(src)), atol=1e-4, rtol=0)

    assert (result.out / "chat_template.jinja").read_bytes() == (src / "chat_template.jinja").read_bytes()
    assert _chat_text(tokenizer) == _chat_text(AutoTokenizer.from_pretrained(src))


def test_quantized_mlx_loads_generates_and_is_smaller(llama_q4: ConvertResult, llama_mlx: ConvertResult) -> None:
    config = json.loads((llama_q4.out / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 4, "mode": "affine"}
    assert (llama_q4.bits, llama_q4.group_size) == (4, 32)

    mlx_lm = _mlx_lm()
    model, tokenizer = mlx_lm.load(str(llama_q4.out))
    text = mlx_lm.generate(model, tokenizer, prompt="The cat sat on", max_tokens=4, verbose=False)
    assert len(tokenizer.encode(text, add_special_tokens=False)) >= 1

    # 4 bits plus a float32 scale and bias per 32 weights: under a third of float32.
    assert _weights_bytes(llama_q4.out) * 3 < _weights_bytes(llama_mlx.out)
    assert llama_q4.bytes_written < llama_mlx.bytes_written


def test_mlx_to_hf_round_trip_is_exact(llama_mlx: ConvertResult, tiny_model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    result = convert_checkpoint(str(llama_mlx.out), tmp_path / "hf", to="hf")
    assert result.dequantized_bits is None
    config = json.loads((result.out / "config.json").read_text())
    assert "quantization" not in config and "quantization_config" not in config

    original, back = _hf_model(tiny_model_dir), _hf_model(result.out)
    before, after = original.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype, name
        assert (after[name] - tensor).abs().max().item() <= 1e-6, name
    np.testing.assert_allclose(_hf_logits(back), _hf_logits(original), atol=1e-4, rtol=0)
    assert _chat_text(AutoTokenizer.from_pretrained(result.out)) == _chat_text(
        AutoTokenizer.from_pretrained(tiny_model_dir)
    )


def test_quantized_mlx_to_hf_dequantizes(llama_q4: ConvertResult, tmp_path: Path) -> None:
    result = convert_checkpoint(str(llama_q4.out), tmp_path / "hf", to="hf")
    assert (result.dequantized_bits, result.dtype) == (4, "float32")
    assert "quantization" not in json.loads((result.out / "config.json").read_text())
    # transformers on the dequantized weights computes what mlx-lm computes on the packed ones.
    mlx_logits, _ = _mlx_logits(llama_q4.out)
    np.testing.assert_allclose(_hf_logits(_hf_model(result.out)), mlx_logits, atol=1e-4, rtol=0)


def test_cli_converts_and_refuses_existing_out(cli: Any, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-mlx"
    done = cli("convert", tiny_model_dir, "--to", "mlx", "--out", out, "--quantize", "8", "--group-size", "32")
    assert done.returncode == 0, done.stderr
    assert "8-bit" in done.stdout and "wrote" in done.stdout
    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8

    again = cli("convert", tiny_model_dir, "--to", "mlx", "--out", out)
    assert again.returncode != 0
    assert "already exists" in again.stderr and "--force" in again.stderr
    assert "Traceback" not in again.stderr + again.stdout


def test_force_replaces_and_failures_leave_nothing(
    llama_mlx: ConvertResult, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    convert_checkpoint(str(llama_mlx.out), out, to="hf", force=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()

    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelError, match="can't load"):
        convert_checkpoint(str(broken), tmp_path / "never", to="mlx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "out"]  # no partial folder left behind


def test_user_mistakes_are_clear_errors(tiny_model_dir: Path, tmp_path: Path) -> None:
    unknown = tmp_path / "unknown"
    shutil.copytree(tiny_model_dir, unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "model_type": "no_such_arch"}))
    with pytest.raises(ModelError, match="no_such_arch") as info:
        convert_checkpoint(str(unknown), tmp_path / "o", to="mlx")
    assert info.value.hint and "llama" in info.value.hint and "qwen2" in info.value.hint

    with pytest.raises(ModelError, match=r"no config.json"):
        convert_checkpoint(str(tmp_path), tmp_path / "o", to="mlx")
    with pytest.raises(ModelError, match="not a checkpoint folder"):
        convert_checkpoint(str(tiny_model_dir / "config.json"), tmp_path / "o", to="mlx")
    with pytest.raises(ConfigError, match="--quantize"):
        convert_checkpoint(str(tiny_model_dir), tmp_path / "o", to="mlx", bits=3)
    assert not (tmp_path / "o").exists()
