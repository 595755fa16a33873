"""Packed batches train exactly what the same examples train one by one, on torch and MLX.

Loss sums and gradients of a packed batch are compared with those of each
example run alone (no padding at all), in fp32, on several architectures; an
example's loss must not move when the example packed before it changes; and a
packed run stopped and resumed ends where an uninterrupted one does.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tests.integration.conftest import base_config, tiny_model_from

from tunelab import services
from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.config.load import load_config
from tunelab.config.schema import DataCfg
from tunelab.data.batching import collate
from tunelab.data.packing import collate_packed
from tunelab.data.prepare import prepare_data
from tunelab.data.tokenize import TokenizedSplit
from tunelab.hub import load_tokenizer
from tunelab.vocab import IGNORE

HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx-lm not installed"))]
ROWS = [np.array([0, 1, 2]), np.array([3, 4]), np.array([5])]  # uneven rows: padding tails are exercised too


@pytest.fixture(scope="module")
def models(chat_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("packing-models")
    archs = {"llama": {}, "qwen2": {}, "gemma2": {"tie_word_embeddings": True}, "mistral": {}}
    models = {arch: tiny_model_from(chat_data, root / arch, arch=arch, **kw) for arch, kw in archs.items()}
    # A sliding window shorter than the examples, so packed attention must honour it too.
    config = json.loads((models["mistral"] / "config.json").read_text(encoding="utf-8"))
    config.update(sliding_window=8, use_sliding_window=True)
    (models["mistral"] / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return models


def _split(model: Path, chat_data: Path) -> tuple[Any, TokenizedSplit]:
    tokenizer = load_tokenizer(model)
    data = prepare_data(DataCfg(train=str(chat_data), max_seq_len=128), tokenizer)
    return tokenizer, data.train


def _backend(
    name: str, model: Path, tokenizer: Any, *, compile: bool = False, device: str = "cpu", attention: str = "auto"
) -> Any:
    if name == "torch":
        from tunelab.backends.torch.backend import TorchBackend

        backend: Any = TorchBackend()
    else:
        from tunelab.backends.mlx.backend import MlxBackend

        backend = MlxBackend()
    spec = ModelSpec(
        str(model), dtype="float32", attn_implementation=attention, device=device, compile=compile, packing=True
    )
    backend.load(spec, MethodSpec("lora", rank=4, alpha=8, dropout=0.0, seed=1), OptimSpec(), tokenizer)
    return backend


def _gradients(backend: Any) -> dict[str, np.ndarray]:
    """The gradients accumulated so far (read from each backend's own store)."""
    if backend.name == "torch":
        return {n: p.grad.cpu().numpy() for n, p in backend.model.named_parameters() if p.requires_grad}
    from mlx.utils import tree_flatten

    return {n: np.array(v) for n, v in tree_flatten(backend._grads)}


@pytest.mark.parametrize("backend_name", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "mistral"])
def test_packed_loss_and_gradients_equal_one_by_one(
    backend_name: str, arch: str, models: dict[str, Path], chat_data: Path
) -> None:
    _check_packed_equals_one_by_one(backend_name, models[arch], chat_data)


@pytest.mark.gpu
@pytest.mark.parametrize(  # auto: flash-attention varlen if installed, else FlexAttention
    ("arch", "attention"), [("llama", "auto"), ("llama", "sdpa"), ("llama", "eager"), ("gemma2", "auto")]
)
def test_cuda_packed_attention_equals_one_by_one(
    attention: str, arch: str, models: dict[str, Path], chat_data: Path
) -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    _check_packed_equals_one_by_one("torch", models[arch], chat_data, device="cuda", attention=attention)


def _check_packed_equals_one_by_one(backend_name: str, model: Path, chat_data: Path, **where: str) -> None:
    tokenizer, split = _split(model, chat_data)
    packed = collate_packed(split, ROWS, tokenizer.pad_token_id)
    singles = [collate(split, np.array([i]), tokenizer.pad_token_id) for i in range(6)]
    # Gradients: one step on the packed batch vs one step on the six examples accumulated one by one.
    results = []
    for batches in ([packed], singles):
        backend = _backend(backend_name, model, tokenizer, **where)
        sums = [backend.forward_backward(b, 1.0) for b in batches]
        grads = _gradients(backend)
        norm = float(backend.optimizer_step(1e-2))
        after = [backend.eval_loss(b) for b in batches]
        results.append((sum(float(s.loss_sum) for s in sums), sum(s.tokens for s in sums), norm, after, grads))
    (p_loss, p_tokens, p_norm, p_after, p_grads), (u_loss, u_tokens, u_norm, u_after, u_grads) = results
    assert p_tokens == u_tokens
    assert abs(p_loss - u_loss) <= 1e-5 * u_loss, (p_loss, u_loss)
    assert abs(p_norm - u_norm) <= 1e-5 * u_norm, (p_norm, u_norm)
    assert p_grads.keys() == u_grads.keys()
    for name, grad in u_grads.items():
        np.testing.assert_allclose(p_grads[name], grad, rtol=0, atol=1e-5 * np.abs(grad).max() + 1e-9, err_msg=name)
    # After the step (LoRA B no longer zero, so the adapters matter too) the losses still agree.
    p_eval, u_eval = sum(a.loss_sum for a in p_after), sum(a.loss_sum for a in u_after)
    assert abs(p_eval - u_eval) <= 1e-5 * u_eval, (p_eval, u_eval)


@pytest.mark.parametrize("backend_name", BACKENDS)
def test_an_example_cannot_see_the_one_packed_before_it(
    backend_name: str, models: dict[str, Path], chat_data: Path
) -> None:
    tokenizer, split = _split(models["qwen2"], chat_data)
    first, second = split.input_ids[0], split.input_ids[1]
    backend = _backend(backend_name, models["qwen2"], tokenizer)
    losses = []
    for noise_seed in (0, 1):
        other = np.random.default_rng(noise_seed).integers(3, 300, size=len(first)).astype(first.dtype)
        pair = TokenizedSplit(
            input_ids=[other, second],
            labels=[np.full(len(first), IGNORE, dtype=np.int32), split.labels[1]],  # only the second is scored
        )
        losses.append(backend.eval_loss(collate_packed(pair, [np.array([0, 1])], tokenizer.pad_token_id)))
    alone = backend.eval_loss(collate(split, np.array([1]), tokenizer.pad_token_id))
    assert losses[0].tokens == losses[1].tokens == alone.tokens
    assert abs(losses[0].loss_sum - losses[1].loss_sum) <= 1e-6 * alone.loss_sum
    assert abs(losses[0].loss_sum - alone.loss_sum) <= 1e-5 * alone.loss_sum


@pytest.mark.skipif(not HAS_MLX, reason="mlx-lm not installed")
def test_mlx_compiled_step_packs_like_the_plain_one(models: dict[str, Path], chat_data: Path) -> None:
    tokenizer, split = _split(models["llama"], chat_data)
    packed = collate_packed(split, ROWS, tokenizer.pad_token_id)
    plain, compiled = (_backend("mlx", models["llama"], tokenizer, compile=c) for c in (False, True))
    a, b = plain.forward_backward(packed, 1.0), compiled.forward_backward(packed, 1.0)
    assert a.tokens == b.tokens and abs(a.loss_sum - b.loss_sum) <= 1e-5 * a.loss_sum


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", BACKENDS)
def test_packed_run_stopped_and_resumed_matches_uninterrupted(
    backend_name: str, e2e_model: Path, chat_data: Path, tmp_path: Path
) -> None:
    from safetensors.numpy import load_file

    def config(out: Path) -> Any:
        raw = base_config(e2e_model, chat_data, out, steps=10, save_every=4, eval_every=5, batch_size=2)
        raw["data"]["packing"] = True
        raw["method"]["dropout"] = 0.2  # dropout makes the RNG state part of what must be restored
        raw["backend"] = backend_name
        return load_config(raw)

    reference = services.start_run(config(tmp_path / "ref"))
    steps = iter(range(1, 100))
    stopped = services.start_run(config(tmp_path / "run"), should_stop=lambda: next(steps) >= 6)
    assert stopped.status == "cancelled"
    resumed = services.resume_run(stopped.run_id)
    assert reference.status == resumed.status == "completed"

    ref_rows, run_rows = _metrics(tmp_path / "ref"), _metrics(tmp_path / "run")
    ref_losses = {r["step"]: r["train_loss"] for r in ref_rows if "train_loss" in r}
    run_losses = {r["step"]: r["train_loss"] for r in run_rows if "train_loss" in r}
    assert sorted(run_losses) == list(range(1, 11))
    for step, loss in ref_losses.items():
        assert abs(run_losses[step] - loss) <= 1e-5 * loss, (step, run_losses[step], loss)
    assert all(r["token_efficiency"] > 0.8 for r in ref_rows if "token_efficiency" in r)  # rows are near-full
    left, right = (load_file(str(o.result_dir / "adapter_model.safetensors")) for o in (reference, resumed))
    assert max(float(np.abs(left[k] - right[k]).max()) for k in left) <= 1e-5
