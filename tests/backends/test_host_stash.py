"""The host stash: parked tensors come back in order, on a CPU and through pinned memory on a GPU."""

from __future__ import annotations

import pytest
import torch

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


@pytest.mark.gpu
def test_on_a_gpu_they_come_back_in_reverse_while_backward_s_kernels_run() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    device, layers = torch.device("cuda"), 8
    stash = HostStash()
    saved: list = []
    for i in range(layers):
        saved = stash.offload(i, torch.full((2**20,), float(i), device=device))
    firsts = []
    for i in reversed(range(layers)):
        (x,) = stash.fetch(saved, i, device)
        torch.cuda._sleep(2_000_000)  # a layer's backward: the early fetch of the next runs beside it
        firsts.append(x[:1].clone())
        del x
    torch.cuda.synchronize()
    assert [float(f) for f in firsts] == [float(i) for i in reversed(range(layers))]
