"""FlashAttention 4 behind torch's flash kernels: only where it is switched on, on a Hopper or Blackwell GPU,
and there the packed attention's output and gradients are torch's own kernel's."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch

from tunelab.backends.torch import flash4


def _output_and_gradients(
    out: torch.Tensor, grad: torch.Tensor, inputs: tuple[torch.Tensor, ...]
) -> list[torch.Tensor]:
    """``out`` and its inputs' gradients for ``grad``, in fp32; the inputs' gradients are cleared for the next run."""
    out.backward(grad)
    got = [out.detach().float(), *(t.grad.float() for t in inputs)]  # type: ignore[union-attr]
    for t in inputs:
        t.grad = None
    return got


def _grouped_qkv(length: int, gen: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Queries of 8 heads over keys and values of 2 (GQA), batch 2, head size 128, bf16 on the GPU, with gradients."""
    return tuple(
        torch.randn(2, h, length, 128, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
        for h in (8, 2, 2)
    )


def _against_torch_s_kernels(
    monkeypatch: pytest.MonkeyPatch,
    run: Callable[[], list[torch.Tensor]],
    turn_on: Callable[[torch.device], bool],
    check: Callable[[], None] = lambda: None,
) -> None:
    """``run`` with torch's kernels, then with FlashAttention 4 turned on by ``turn_on`` (a skip on a GPU it has no
    kernels for), ``check`` before that run: output and gradients agree to bf16 rounding.  torch's kernels come
    back after."""
    if torch.cuda.get_device_capability()[0] not in flash4.MAJORS:
        pytest.skip("FlashAttention 4 has no kernels for this GPU")
    theirs = run()
    monkeypatch.setattr(flash4, "ON", True)
    try:
        # installed, on a GPU it has kernels for: not taking it is a failure (its log line says why)
        assert turn_on(torch.device("cuda"))
        check()
        mine = run()
    finally:
        flash4._unroute()  # later tests expect torch's own kernels
    for name, a, b in zip(("out", "dq", "dk", "dv"), mine, theirs, strict=True):
        assert float((a - b).norm() / b.norm()) < 2e-2, name  # bf16 operands, another summation order


LLAMA_8B = SimpleNamespace(num_attention_heads=32, hidden_size=4096, attention_dropout=0.0)  # head size 128


def test_packed_rows_stay_off_unless_switched_on_outright_and_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not flash4.activate(torch.device("cpu"))  # by default only whole long rows take it
    monkeypatch.setattr(flash4, "ON", True)
    assert not flash4.activate(torch.device("cpu"))  # no CUDA device: torch's CPU kernels run


def test_by_default_whole_rows_take_it_from_16k_tokens_where_the_model_s_attention_suits_its_kernels() -> None:
    assert flash4.ON == "long"
    assert flash4.pays(LLAMA_8B, 16_384)
    assert not flash4.pays(LLAMA_8B, 2048)  # measured slower than cuDNN there
    assert not flash4.pays(LLAMA_8B, None)  # length unknown
    dropout = SimpleNamespace(num_attention_heads=32, hidden_size=4096, attention_dropout=0.1)
    assert not flash4.pays(dropout, 16_384)  # its kernels raise on attention dropout in training
    gemma = SimpleNamespace(num_attention_heads=8, hidden_size=2048, head_dim=256)
    assert not flash4.pays(gemma, 16_384)  # head size 256: not every GPU it runs on takes it
    qwen = SimpleNamespace(num_attention_heads=14, hidden_size=896)  # head size 64, no attention_dropout key
    assert flash4.pays(qwen, 32_768)


def test_a_trial_step_that_fails_hands_the_run_back_to_torch_s_kernels(caplog: pytest.LogCaptureFixture) -> None:
    """take_sdpa's trial: whatever the kernels raise is caught and logged, so the run goes on with torch's own.

    On a GPU the trial runs FlashAttention 4; here torch's CPU kernel, on a model whose key/value heads
    don't divide its query heads, which every kernel refuses."""
    cpu = torch.device("cpu")
    assert flash4._runs(cpu, LLAMA_8B, torch.float32)
    odd = SimpleNamespace(num_attention_heads=32, num_key_value_heads=3, hidden_size=4096)
    with caplog.at_level("WARNING", logger=flash4.__name__):
        assert not flash4._runs(cpu, odd, torch.float32)
    assert "failed a trial step" in caplog.text
    flash4._unroute()
    assert torch.backends.cuda.cudnn_sdp_enabled()


def test_switched_off_no_row_takes_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(flash4, "ON", False)
    assert not flash4.pays(LLAMA_8B, 32_768)
    monkeypatch.setattr(flash4, "ON", True)
    assert flash4.pays(LLAMA_8B, 2048)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash_attn.cute (bench/fetch_fa4.sh)")
def test_on_a_gpu_the_packed_attention_gives_torch_s_output_and_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.backends.torch.attention import torch_varlen

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _grouped_qkv(512, gen)
    starts = torch.tensor([0, 100, 412, 512, 900, 1024], dtype=torch.int32, device="cuda")
    grad = torch.randn(2, 512, 8, 128, device="cuda", dtype=torch.bfloat16, generator=gen)

    def run() -> list[torch.Tensor]:
        out, _ = torch_varlen(None, q, k, v, None, scaling=128**-0.5, cu_seq_lens_q=starts, max_length_q=412)
        return _output_and_gradients(out, grad, (q, k, v))

    if not flash4._backward_takes_varlen():
        pytest.skip("this torch's FA4 backward refuses varlen's causal window (torch 2.11)")
    _against_torch_s_kernels(monkeypatch, run, flash4.activate)


def test_rows_that_are_not_packed_keep_cudnn_unless_it_is_switched_on_and_on_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from tunelab.backends.torch.attention import choose_row_attention

    config = SimpleNamespace(_attn_implementation="sdpa", **vars(LLAMA_8B))
    model = SimpleNamespace(config=config)
    assert torch.backends.cuda.cudnn_sdp_enabled()
    assert not flash4.take_sdpa(torch.device("cpu"), config, 16_384)
    monkeypatch.setattr(flash4, "ON", True)
    choose_row_attention(model, torch.device("cpu"), "auto", 16_384)
    assert not flash4.take_sdpa(torch.device("cpu"), config, 16_384)
    assert torch.backends.cuda.cudnn_sdp_enabled()  # nothing process-wide changed off a GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs flash_attn.cute (bench/fetch_fa4.sh)")
def test_on_a_gpu_sdpa_over_whole_rows_runs_it_with_cudnn_s_output_and_gradients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows that are not packed: sdpa, causal, grouped k/v heads, as transformers calls it for a Llama."""
    from torch.nn.attention import SDPBackend

    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = _grouped_qkv(1024, gen)
    grad = torch.randn(2, 8, 1024, 128, device="cuda", dtype=torch.bfloat16, generator=gen)

    def run() -> list[torch.Tensor]:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return _output_and_gradients(out, grad, (q, k, v))

    def takes_flash() -> None:  # sdpa now takes the flash backend, that is FlashAttention 4
        choice = torch._fused_sdp_choice(q, k, v, None, 0.0, True, scale=None, enable_gqa=True)
        assert choice == SDPBackend.FLASH_ATTENTION.value

    _against_torch_s_kernels(monkeypatch, run, lambda device: flash4.take_sdpa(device, LLAMA_8B, 1024), takes_flash)
