"""A step's numbers are read back without waiting for the work queued after them."""

from __future__ import annotations

import pytest
import torch

from tunelab.backends.torch.readback import Pending, later


def test_off_cuda_the_tensor_itself_is_read() -> None:
    value = torch.tensor(2.5, requires_grad=True) * 2
    read = later(value)
    assert isinstance(read, torch.Tensor) and not read.requires_grad
    assert float(read) == 5.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_reading_waits_for_the_number_not_for_the_work_queued_after_it() -> None:
    loss = (torch.arange(100, device="cuda", dtype=torch.float32) ** 2).sum()
    pending = later(loss)
    assert isinstance(pending, Pending)
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU clock cycles queued behind the copy
    assert float(pending) == 328350.0  # exact in fp32
    # float(loss) would have waited for the sleep too; the stream still has it queued.
    assert not torch.cuda.current_stream().query()
    torch.cuda.synchronize()
