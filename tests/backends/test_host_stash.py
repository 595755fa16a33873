"""The host stash: parked tensors come back in order, and with a bounded lead the fetched ones stay few."""

from __future__ import annotations

import pytest
import torch

from tunelab.backends.torch import host_stash
from tunelab.backends.torch.host_stash import HostStash


def test_on_a_cpu_the_tensors_are_kept_as_they_are_and_come_back_in_reverse() -> None:
    stash = HostStash()
    layers = [torch.full((4,), float(i)) for i in range(5)]
    saved: list = []
    for i, t in enumerate(layers):
        saved = stash.offload(i, t, t * 2)
    for i in reversed(range(5)):
        x, doubled = stash.fetch(saved, i, torch.device("cpu"))
        assert x is layers[i] or torch.equal(x, layers[i])
        assert torch.equal(doubled, layers[i] * 2)
        assert saved[i] is None  # handed back once: the stash holds nothing a layer has used


def _fetched_peak(layers: int, mib: int, lead: int | None, monkeypatch: pytest.MonkeyPatch) -> tuple[int, bool]:
    """Backward's walk over ``layers`` stashed inputs, each used by a slow kernel; the most bytes allocated then."""
    monkeypatch.setattr(host_stash, "LEAD", lead)
    device = torch.device("cuda")
    numel = mib * 2**20 // 4
    stash = HostStash()
    saved: list = []
    for i in range(layers):
        saved = stash.offload(i, torch.full((numel,), float(i), device=device))
    torch.cuda.synchronize()
    torch.empty(1, device=device)  # an allocation frees the blocks whose copies out are done
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    firsts = []
    for i in reversed(range(layers)):
        (x,) = stash.fetch(saved, i, device)
        torch.cuda._sleep(20_000_000)  # the layer's backward: ~10 ms of GPU time the host needn't wait for
        firsts.append(x[:1].clone())  # read after the walk: reading now would make the host wait
        del x
    torch.cuda.synchronize()
    right = [float(f) for f in firsts] == [float(i) for i in reversed(range(layers))]
    return torch.cuda.max_memory_allocated() - start, right


@pytest.mark.gpu
def test_a_bounded_lead_keeps_three_fetched_layers_where_an_unbounded_one_fetches_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    mib, layers = 64, 12
    ahead, right_ahead = _fetched_peak(layers, mib, None, monkeypatch)
    bounded, right_bounded = _fetched_peak(layers, mib, 1, monkeypatch)
    assert right_ahead and right_bounded
    one = mib * 2**20
    assert bounded <= 3 * one + 2**20  # the layer the GPU runs, this one, the one fetched early (and the reads)
    assert ahead >= 6 * one  # the host ran ahead and fetched for layers the GPU hadn't reached
