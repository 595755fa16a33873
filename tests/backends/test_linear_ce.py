"""The chunked LM head + cross-entropy equals the plain loss, in value and in every gradient."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from tunelab.backends.torch.linear_ce import chunk_rows, linear_cross_entropy  # noqa: E402


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_loss_and_gradients_match_the_plain_loss(softcap: float | None, train_head: bool, bias: bool) -> None:
    torch.manual_seed(0)
    n, h, v = 301, 24, 97  # 301 rows in chunks of 64: the last chunk is partial
    x = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias)
    head.requires_grad_(train_head)
    y = torch.randint(0, v, (n,))

    def grads() -> list[torch.Tensor]:
        out = [x.grad.clone()] + [p.grad.clone() for p in head.parameters() if p.requires_grad]
        x.grad = None
        head.zero_grad()
        return out

    loss = linear_cross_entropy(x, head, y, softcap=softcap, rows=64)
    (0.37 * loss).backward()
    ours = grads()
    logits = head(x).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.nn.functional.cross_entropy(logits, y, reduction="sum")
    (0.37 * ref).backward()
    assert float(loss) == pytest.approx(float(ref), rel=1e-6)
    for a, b in zip(ours, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _chunk_inputs(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    logits = (torch.randn(96, 4099, device=device) * 4).to(torch.bfloat16)  # an odd vocabulary: masked tails
    return logits, torch.randint(0, 4099, (96,), device=device)


def _reference(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = logits.float()
    loss = torch.nn.functional.cross_entropy(z, labels, reduction="sum")
    grad = torch.softmax(z, -1) - torch.nn.functional.one_hot(labels, z.shape[1]).float()
    return loss, grad


def test_the_compiled_chunk_gives_the_textbook_loss_and_gradient() -> None:
    """The chunk's log-sum-exp is spelled out (max, shift, exp, sum) for inductor; eager and compiled agree."""
    from tunelab.backends.torch.linear_ce import _chunk_loss_grad

    logits, labels = _chunk_inputs("cpu")
    want_loss, want_grad = _reference(logits, labels)
    for fn in (_chunk_loss_grad, torch.compile(_chunk_loss_grad, backend="inductor")):
        loss, grad = fn(logits, labels, 0.0, True)
        assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
        torch.testing.assert_close(grad.float(), want_grad, rtol=0, atol=4e-3)  # bf16 rounding of the gradient


@pytest.mark.gpu
def test_on_a_gpu_the_chunk_s_log_sum_exp_is_one_online_softmax_pass() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._inductor.utils import run_and_get_code

    from tunelab.backends.torch.linear_ce import _chunk_loss_grad

    torch._dynamo.reset()
    logits, labels = _chunk_inputs("cuda")
    (loss, grad), codes = run_and_get_code(torch.compile(_chunk_loss_grad), logits, labels, 0.0, True)
    want_loss, want_grad = _reference(logits, labels)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-5)
    torch.testing.assert_close(grad.float(), want_grad, rtol=0, atol=4e-3)
    assert "online_softmax" in "\n".join(codes)  # max and sum in one read of the chunk, not two


def test_a_chunk_of_a_large_vocabulary_stays_small() -> None:
    assert chunk_rows(128_256) == 256  # ~128 MiB of fp32 logits per chunk, in whole tiles of 64 rows
    assert chunk_rows(151_936) == 192 and chunk_rows(32_000) == 1024
    assert chunk_rows(400) >= 80_000  # tiny vocabularies: one chunk


@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_logprobs_and_their_gradients_match_the_plain_log_softmax(
    softcap: float | None, train_head: bool, bias: bool
) -> None:
    from tunelab.backends.torch.linear_ce import linear_logprobs

    torch.manual_seed(1)
    n, h, v = 301, 24, 97
    x = torch.randn(n, h, requires_grad=True)
    head = torch.nn.Linear(h, v, bias=bias)
    head.requires_grad_(train_head)
    y = torch.randint(0, v, (n,))
    weights = torch.randn(n)  # a per-position upstream gradient, as a preference loss gives

    def grads() -> list[torch.Tensor]:
        out = [x.grad.clone()] + [p.grad.clone() for p in head.parameters() if p.requires_grad]
        x.grad = None
        head.zero_grad()
        return out

    ours = linear_logprobs(x, head, y, softcap=softcap, rows=64)
    (ours * weights).sum().backward()
    mine = grads()
    logits = head(x).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    ref = torch.log_softmax(logits, dim=-1).gather(1, y[:, None]).squeeze(1)
    (ref * weights).sum().backward()
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(mine, grads(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
