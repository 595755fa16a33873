"""The replay's attention reads the first run's output and log-sum-exp back instead of running its forward
kernel again: the same losses and gradients as sdpa's own path, eager and compiled, with grouped k/v heads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tests.backends.conftest import assert_same_loss_and_grads, load_backend
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec
from tunelab.backends.torch import joined_b, kept_attention
from tunelab.backends.torch.backend import TorchBackend
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.loading import decoder_layers


def _run(
    folder: Path,
    tokenizer: Any,
    *,
    kept: bool,
    compiled: str | None = None,
    batch: dict[str, np.ndarray] | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    monkeypatch: pytest.MonkeyPatch | None = None,
    count_flash: bool = True,
    host_bytes: int | None = None,
    joined: bool = False,
) -> tuple[list[float], dict[str, torch.Tensor], int, int]:
    """Two micro-batches through checkpointed layers; returns losses, gradients, the flash forwards run (with
    ``monkeypatch`` and ``count_flash``: a count inside a compiled graph would recompile it) and how many layer
    runs parked an output and log-sum-exp (with ``monkeypatch``)."""
    # joined: as on a GPU, where B joins gate's and up's products
    backend = load_backend(folder, tokenizer, device=device, dtype=dtype, switches=((joined_b, joined or "cuda"),))
    base = backend._causal_lm
    layers = decoder_layers(base)
    assert (getattr(layers[0].mlp.gate_proj, joined_b.BUFFER, None) is not None) is (joined or device == "cuda")
    if kept:
        assert kept_attention.keep_attention(base, host_bytes)
        backend._attention = kept_attention.KEPT_SDPA
    forwards, parked = [0], [0]
    take = kept_attention.take

    def counted_take(layer: Any) -> tuple[torch.Tensor, ...]:
        found = take(layer)
        parked[0] += len(found) == 2
        return found

    if monkeypatch is not None:
        monkeypatch.setattr(kept_attention, "take", counted_take)
    if monkeypatch is not None and count_flash:
        flash = kept_attention._forward

        def counted(*args: Any) -> Any:
            forwards[0] += 1
            return flash(*args)

        monkeypatch.setattr(kept_attention, "_forward", counted)
    if compiled:
        for layer in layers:
            layer.compile(backend=compiled)
    checkpoint_layers(layers, offload=True)
    base.enable_input_require_grads()
    torch.manual_seed(2)
    losses = [float(backend.forward_backward(batch or _batch(), 1.0).loss_sum) for _ in range(2)]
    grads = {n: p.grad.float().clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    assert not any(kept_attention.KEPT in layer.self_attn.__dict__ for layer in layers)  # nothing left behind
    return losses, grads, forwards[0], parked[0]


def test_the_replay_reads_the_first_runs_attention_back_with_the_same_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    kept = _run(tiny_model_dir, tiny_tokenizer, kept=True, monkeypatch=monkeypatch)
    plain = _run(tiny_model_dir, tiny_tokenizer, kept=False)
    assert_same_loss_and_grads(kept, plain, "q_proj.lora_A")  # q's gradient flows only through attention
    assert kept[2] == kept[3] == 2 * 2  # one flash forward per layer and micro-batch, parked: none on the replays


def test_a_masked_batch_takes_sdpas_own_path_in_both_runs(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch = _batch()
    batch["attention_mask"][0, :5] = 0  # left padding: the mask stays, and the flash kernel doesn't apply
    kept = _run(tiny_model_dir, tiny_tokenizer, kept=True, batch=batch, monkeypatch=monkeypatch)
    plain = _run(tiny_model_dir, tiny_tokenizer, kept=False, batch=batch)
    assert_same_loss_and_grads(kept, plain, "q_proj.lora_A")
    assert kept[2] == kept[3] == 0


def test_past_the_host_budget_the_replay_runs_the_forward_again(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    one_output = 2 * 24 * 32 * 4  # 2 rows of 24 positions, 32 wide, fp32
    kept = _run(tiny_model_dir, tiny_tokenizer, kept=True, host_bytes=2 * (2 * one_output) - 1, monkeypatch=monkeypatch)
    plain = _run(tiny_model_dir, tiny_tokenizer, kept=False)
    assert_same_loss_and_grads(kept, plain, "q_proj.lora_A")
    assert kept[3] == 0 and kept[2] == 0
    room = 2 * (2 * one_output)  # two layers, each an output and an input
    assert _run(tiny_model_dir, tiny_tokenizer, kept=True, host_bytes=room, monkeypatch=monkeypatch)[3] == 4


def test_compiled_layers_read_it_back_with_one_graph_per_run_and_no_break(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # a thread count change recompiles too
    torch._dynamo.reset()
    counters.clear()
    try:
        kept = _run(tiny_model_dir, tiny_tokenizer, kept=True, compiled="aot_eager", monkeypatch=monkeypatch,
                    count_flash=False)  # fmt: skip
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        entries = len(_debug_get_cache_entry_list(LlamaDecoderLayer.forward.__code__))
        breaks = dict(counters["graph_break"])
    finally:
        torch._dynamo.reset()
    plain = _run(tiny_model_dir, tiny_tokenizer, kept=False)
    assert_same_loss_and_grads(kept, plain, "q_proj.lora_A")
    assert breaks == {}
    assert kept[3] == 2 * 2  # the compiled first run parked in every layer and micro-batch
    assert entries == 2  # the first run (which parks) and the replay (which reads back), shared by both layers


def test_with_b_joined_and_compiled_layers_as_on_a_gpu_the_gradients_are_the_plain_runs(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a CUDA run has on by default together: shared A, joined B, kept attention, compiled layers."""
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    torch._dynamo.reset()
    try:
        kept = _run(tiny_model_dir, tiny_tokenizer, kept=True, compiled="aot_eager", monkeypatch=monkeypatch,
                    count_flash=False, joined=True)  # fmt: skip
    finally:
        torch._dynamo.reset()
    plain = _run(tiny_model_dir, tiny_tokenizer, kept=False)
    assert_same_loss_and_grads(kept, plain, "up_proj.lora_B")
    assert kept[3] == 2 * 2


def test_outside_a_checkpoint_it_is_sdpa(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """Evaluation and generation run plain sdpa and leave nothing on the modules."""
    backend = TorchBackend()
    backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"), MethodSpec("lora"), OptimSpec(),
                 tiny_tokenizer)  # fmt: skip
    ids = torch.tensor(_batch()["input_ids"])
    with torch.no_grad():
        before = backend.model(input_ids=ids).logits
        assert kept_attention.keep_attention(backend._causal_lm)
        after = backend.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not any(kept_attention.KEPT in layer.self_attn.__dict__ for layer in decoder_layers(backend._causal_lm))


def test_the_backend_keeps_it_only_where_checkpoints_are_offloaded(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a CPU the checkpoints stay where they are, so parking the output would only add memory."""
    monkeypatch.setattr(kept_attention, "ON", True)
    backend = TorchBackend()
    backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu", gradient_checkpointing=True),
                 MethodSpec("lora"), OptimSpec(), tiny_tokenizer)  # fmt: skip
    assert backend._attention == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [None, "inductor"])
def test_on_cuda_the_flash_kernels_backward_gives_the_same_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, compiled: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    torch._dynamo.reset()
    kept = _run(tiny_model_dir, tiny_tokenizer, kept=True, compiled=compiled, device="cuda", dtype="bfloat16",
                monkeypatch=monkeypatch, count_flash=False)  # fmt: skip
    torch._dynamo.reset()
    plain = _run(tiny_model_dir, tiny_tokenizer, kept=False, compiled=compiled, device="cuda", dtype="bfloat16")
    torch._dynamo.reset()
    assert_same_loss_and_grads(kept, plain, "q_proj.lora_A", tol=2e-2)
    assert kept[3] == 2 * 2
