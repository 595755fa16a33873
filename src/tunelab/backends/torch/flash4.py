"""FlashAttention 4 behind torch's flash kernels, where it is installed.

On CUDA, packed rows run :func:`attention.torch_varlen`, which calls torch's own
flash kernel through ``torch.nn.attention.varlen``.  torch (2.11 and later) can
route that kernel to FlashAttention 4 (the ``flash_attn.cute`` package, CuTe DSL
kernels for Hopper and Blackwell) with
``torch.nn.attention.activate_flash_attention_impl("FA4")``: same call, same
inputs, another kernel.  On an H100 torch's kernels reached ~330-430 TFLOP/s on
the issue-15 rows' attention, 8-11% of the step.

Rows that are not packed (``data.packing`` is off by default, and so in the
rows beside Unsloth) run transformers' ``sdpa``, which on a Hopper GPU takes
cuDNN's kernel before the flash one.  The activation routes sdpa's flash
backend to FlashAttention 4 too, so :func:`take_sdpa` also turns cuDNN's off
for the process: sdpa then picks flash, and so FlashAttention 4, wherever flash
takes the call (a call flash can't take goes on to the memory-efficient kernel,
which is why this is measured before it is on).  torch's FA4 kernels raise on a call they
can't take (attention dropout, a debug mask, ALiBi) rather than fall back, so before this goes on by
default, a run with any of those must keep torch's kernels.

Off (:data:`ON`) until ``bench/fa4_attention.py`` and an A/B through
``tunelab train`` on a GPU show that it pays (``bench/gpu_env.sh``'s switch
``fa4``; the package reaches the GPU machine through ``bench/fetch_fa4.sh``).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ON = False
# Compute capabilities FlashAttention 4 has kernels for (Hopper, Blackwell).
MAJORS = (9, 10)


def activate(device: torch.device) -> bool:
    """Route torch's flash kernels to FlashAttention 4 on ``device`` where it applies; returns whether it does.

    Process-wide (the dispatcher's kernels): a training process runs one model.
    """
    if not ON or device.type != "cuda" or torch.cuda.get_device_capability(device)[0] not in MAJORS:
        return False
    try:
        from torch.nn.attention import activate_flash_attention_impl
    except ImportError:  # torch before 2.11
        log.info("FlashAttention 4: this torch cannot route its flash kernels to it")
        return False
    try:
        activate_flash_attention_impl("FA4")
    except (ImportError, RuntimeError, ValueError) as exc:  # flash_attn.cute not installed, or too old
        log.info("FlashAttention 4 unavailable (%s): torch's own flash kernels run", exc)
        return False
    log.info("FlashAttention 4 runs torch's flash kernels")
    return True


def take_sdpa(device: torch.device) -> bool:
    """:func:`activate`, and make sdpa prefer its flash backend (now FlashAttention 4) to cuDNN's; returns whether.

    Process-wide, as the activation is.
    """
    if not activate(device):
        return False
    torch.backends.cuda.enable_cudnn_sdp(False)
    log.info("FlashAttention 4 runs sdpa's attention (cuDNN's kernel turned off)")
    return True
