"""The MLX backend: same numbers as torch, PEFT-format adapters both ways, exact resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import yaml
from tests.integration.conftest import base_config, tiny_model_from
from tests.integration.runs import adapter_diff, only_run_id, reference_val_loss, start_cli, wait_for

from tunelab import services
from tunelab.config.load import load_config

pytest.importorskip("mlx.core")
pytest.importorskip("mlx_lm")

pytestmark = pytest.mark.slow


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def _parity_config(model: Path, data: Path, out: Path, backend: str, method: str) -> dict:
    raw = base_config(model, data, out, steps=15, eval_every=5, lr=1e-2)
    raw["method"].update(name=method, dropout=0.0)
    raw["backend"] = backend
    return raw


@pytest.mark.parametrize(("arch", "method"), [("llama", "lora"), ("qwen2", "dora"), ("gemma2", "full")])
def test_torch_and_mlx_agree(arch: str, method: str, chat_data: Path, tmp_path: Path) -> None:
    model = tiny_model_from(chat_data, tmp_path / "model", arch=arch, tie_word_embeddings=arch.startswith("gemma"))
    runs = {}
    for backend in ("torch", "mlx"):
        outcome = services.start_run(load_config(_parity_config(model, chat_data, tmp_path / backend, backend, method)))
        shown = services.show_run(outcome.run_id)
        assert shown["backend"] == backend
        runs[backend] = _metrics(tmp_path / backend)
    first = {b: next(r["train_loss"] for r in rows if "train_loss" in r) for b, rows in runs.items()}
    final = {b: [r["val_loss"] for r in rows if "val_loss" in r][-1] for b, rows in runs.items()}
    assert abs(first["torch"] - first["mlx"]) <= 1e-4, first
    assert abs(final["torch"] - final["mlx"]) / final["torch"] <= 0.01, final


def test_mlx_adapter_reproduces_its_val_loss_in_peft(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = load_config(_parity_config(e2e_model, chat_data, tmp_path / "run", "mlx", "lora"))
    outcome = services.start_run(cfg)
    reported = services.show_run(outcome.run_id)["metrics"]["val_loss"]
    base = AutoModelForCausalLM.from_pretrained(str(e2e_model), dtype=torch.float32)
    measured = reference_val_loss(
        PeftModel.from_pretrained(base, str(outcome.result_dir)), outcome.result_dir, cfg.data
    )
    assert abs(measured - reported) / reported < 1e-3, (measured, reported)


def test_torch_adapter_generates_the_same_on_mlx(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from tunelab.backends.mlx.backend import MlxBackend
    from tunelab.backends.torch.backend import TorchBackend
    from tunelab.inference import Generator, load_generator

    cfg = load_config(_parity_config(e2e_model, chat_data, tmp_path / "run", "torch", "dora"))
    adapter = services.start_run(cfg).result_dir
    on_torch = load_generator(model=str(e2e_model), adapter=str(adapter), chat=True)
    assert isinstance(on_torch.backend, TorchBackend)
    from tunelab.backends.base import ModelSpec

    mlx_backend = MlxBackend()
    mlx_backend.load_inference(ModelSpec(str(e2e_model)), adapter, on_torch.tokenizer)
    on_mlx = Generator(mlx_backend, on_torch.tokenizer, chat=True)
    prompt = "List: tea, rice, honey"
    assert on_mlx.prompt_ids(prompt) == on_torch.prompt_ids(prompt)
    assert on_mlx.complete(prompt, max_new_tokens=16) == on_torch.complete(prompt, max_new_tokens=16)


def test_mlx_sigkill_then_resume_matches_uninterrupted(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    def write(root: Path) -> Path:
        raw = base_config(e2e_model, chat_data, root / "out", steps=40, save_every=5, eval_every=20)
        raw["method"]["dropout"] = 0.2
        raw["backend"] = "mlx"
        (root / "cfg.yaml").parent.mkdir(parents=True, exist_ok=True)
        (root / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        return root / "cfg.yaml"

    ref = start_cli("train", str(write(tmp_path / "ref")), home=tmp_path / "ref" / "home")
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err

    home = tmp_path / "crash" / "home"
    proc = start_cli("train", str(write(tmp_path / "crash")), home=home)
    wait_for(tmp_path / "crash" / "out" / "checkpoints" / "step-10", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "crash" / "out" / "adapter").exists(), "the run finished before it could be killed"
    resumed = start_cli("train", "--resume", only_run_id(home), home=home)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert adapter_diff(tmp_path / "ref" / "out" / "adapter", tmp_path / "crash" / "out" / "adapter") <= 1e-5


def test_mlx_full_finetune_loads_in_transformers(e2e_model: Path, chat_data: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    cfg = load_config(_parity_config(e2e_model, chat_data, tmp_path / "run", "mlx", "full"))
    outcome = services.start_run(cfg)
    model = AutoModelForCausalLM.from_pretrained(str(outcome.result_dir))
    measured = reference_val_loss(model, outcome.result_dir, cfg.data)
    reported = services.show_run(outcome.run_id)["metrics"]["val_loss"]
    assert abs(measured - reported) / reported < 1e-3
