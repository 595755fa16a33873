"""QLoRA's config rules, backend choice and torch refusals (fast), plus torch QLoRA on a GPU (gpu-marked)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import yaml
from pydantic import ValidationError

from tunelab.backends.select import Environment, decide
from tunelab.config.schema import MethodCfg
from tunelab.errors import BackendError, ConfigError

LINUX = Environment(
    "linux", "x86_64", has_torch=True, has_mlx=True, has_mlx_lm=True, mlx_lm_model_types=frozenset({"llama"})
)


def test_qlora_defaults_to_4_bits_and_group_64() -> None:
    method = MethodCfg(name="qlora")
    assert (method.bits, method.group_size) == (4, 64)
    assert MethodCfg(name="qlora", bits=8).bits == 8
    assert MethodCfg().bits is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"name": "lora", "bits": 4}, "bits is for name: qlora"),
        ({"name": "qlora", "bits": 3}, "bits must be 4 or 8"),
        ({"name": "qlora", "group_size": 48}, "group_size must be 32, 64 or 128"),
    ],
)
def test_config_refuses_inconsistent_quantization(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        MethodCfg(**fields)


def test_auto_picks_mlx_for_qlora_without_cuda_and_torch_with_it() -> None:
    assert decide(LINUX, "auto", "qlora", "llama").name == "mlx"
    assert decide(replace(LINUX, cuda=True), "auto", "qlora", "llama").name == "torch"
    assert decide(LINUX, "auto", "lora", "llama").name == "torch"  # only qlora changes the default


def test_auto_qlora_without_cuda_or_mlx_says_what_to_install() -> None:
    with pytest.raises(BackendError, match="needs a CUDA GPU") as info:
        decide(replace(LINUX, has_mlx=False), "auto", "qlora", "llama")
    assert "tunelab[mlx]" in str(info.value)


def test_an_mlx_quantized_checkpoint_goes_to_mlx(tmp_path: Path) -> None:
    from tunelab.backends.select import is_mlx_quantized

    assert decide(replace(LINUX, cuda=True), "auto", "lora", "llama", mlx_quantized=True).name == "mlx"
    with pytest.raises(BackendError, match="can't load an MLX-quantized checkpoint") as info:
        decide(LINUX, "torch", "lora", "llama", mlx_quantized=True)
    assert "--to hf" in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"quantization": {"bits": 4, "group_size": 64}}))
    assert is_mlx_quantized(tmp_path) and not is_mlx_quantized(tmp_path / "missing")


def _config(folder: Path, model: Path, **top: object) -> Path:
    data = folder / "train.jsonl"
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    raw = {
        "model": {"path": str(model)},
        "data": {"train": str(data), "max_seq_len": 32},
        "method": {"name": "qlora"},
        "train": {"steps": 1, "batch_size": 1},
        "device": "cpu",
        "output_dir": str(folder / "out"),
        "tensorboard": False,
        **top,
    }
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


# The CLI as a user without bitsandbytes runs it: a None entry in sys.modules is how Python marks a module
# that can't be imported (find_spec answers None, import raises), so the suite can install it for the rest.
_CLI_WITHOUT_BITSANDBYTES = (
    "import sys\n"
    "sys.modules['bitsandbytes'] = None\n"
    "sys.argv[0] = 'tunelab'\n"
    "from tunelab.cli.main import main\n"
    "main()\n"
)


def test_torch_qlora_without_bitsandbytes_fails_cleanly(
    cli: Callable[..., CompletedProcess[str]], tokenizer_only_model_dir: Path, tmp_path: Path
) -> None:
    # A model folder without weights: the refusal must come before loading.
    config = _config(tmp_path, tokenizer_only_model_dir, backend="torch")
    proc = cli("train", config, command=[sys.executable, "-c", _CLI_WITHOUT_BITSANDBYTES])
    output = proc.stdout + proc.stderr
    assert proc.returncode == BackendError.exit_code != 0, output
    assert "Traceback" not in output, output
    assert "needs bitsandbytes" in output and "backend: mlx" in output, output


@pytest.mark.parametrize(
    ("method", "message"),
    [({"name": "lora", "bits": 4}, "method: bits is for name: qlora"), ({"name": "qlora", "bits": 2}, "bits must be")],
)
def test_cli_refuses_bad_quantization_settings(
    cli: Callable[..., CompletedProcess[str]], tiny_model_dir: Path, tmp_path: Path, method: dict, message: str
) -> None:
    proc = cli("train", _config(tmp_path, tiny_model_dir, method=method))
    output = proc.stdout + proc.stderr
    assert proc.returncode == ConfigError.exit_code, output
    assert "Traceback" not in output and message in output, output


def test_offload_activations_is_refused_off_cuda(tiny_model_dir: Path) -> None:
    pytest.importorskip("torch")
    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch.backend import TorchBackend

    spec = ModelSpec(str(tiny_model_dir), device="cpu", offload_activations=True)
    with pytest.raises(ConfigError, match="offload_activations"):
        TorchBackend().load(spec, MethodSpec(), OptimSpec(), tokenizer=None)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_torch_qlora_trains_on_cuda_and_saves_a_peft_adapter(tiny_model_dir: Path, tmp_path: Path, bits: int) -> None:
    torch = pytest.importorskip("torch")
    pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU")
    import numpy as np
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
    from tunelab.backends.torch.backend import TorchBackend
    from tunelab.hub import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    backend = TorchBackend()
    spec = ModelSpec(str(tiny_model_dir), device="cuda", gradient_checkpointing=True, offload_activations=True)
    info = backend.load(spec, MethodSpec("qlora", rank=4, bits=bits), OptimSpec(), tokenizer)
    assert info.dtype.startswith("nf4" if bits == 4 else "int8")
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 16))
    batch = {"input_ids": ids, "labels": ids, "attention_mask": np.ones_like(ids)}
    losses = []
    for _ in range(10):
        losses.append(float(backend.forward_backward(batch, 1 / 32).loss_sum))
        backend.optimizer_step(1e-2)
    assert losses[-1] < losses[0]
    backend.save_adapter(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tmp_path / "adapter"))  # the adapter loads onto the full-precision base


def test_estimator_follows_qlora_and_offload_settings(tiny_model_dir: Path) -> None:
    from tunelab.config.schema import RunConfig
    from tunelab.memory.estimate import estimate
    from tunelab.memory.plan import workload
    from tunelab.memory.shapes import read_shape

    shape = read_shape(tiny_model_dir)
    raw = {"model": {"path": str(tiny_model_dir)}, "data": {"train": "x.jsonl", "max_seq_len": 512}}
    plain = RunConfig.model_validate({**raw, "method": {"name": "lora"}})
    qlora = RunConfig.model_validate({**raw, "method": {"name": "qlora", "bits": 8}})
    offload = RunConfig.model_validate({**raw, "method": {"name": "qlora"}, "train": {"offload_activations": True}})
    work = {name: workload(cfg, shape, backend="torch", device="cuda") for name, cfg in
            (("plain", plain), ("qlora", qlora), ("offload", offload))}  # fmt: skip
    assert (work["plain"].bits, work["qlora"].bits, work["offload"].bits) == (None, 8, 4)
    assert work["offload"].offload_activations and not work["qlora"].offload_activations
    assert estimate(shape, work["qlora"]).get("weights") < estimate(shape, work["plain"]).get("weights")
    with_acts = estimate(shape, replace(work["offload"], offload_activations=False)).get("activations")
    assert estimate(shape, work["offload"]).get("activations") < with_acts
    # Off CUDA there is nothing to offload to: the option does not change the prediction.
    assert not workload(offload, shape, backend="mlx", device="cpu").offload_activations
