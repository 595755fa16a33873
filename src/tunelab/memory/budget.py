"""How much memory a training run may use on a device.

On NVIDIA GPUs the card's total memory; on Apple Silicon the GPU's
*recommended working set* (Metal's limit for one process, well below the
machine's RAM); on a CPU the machine's RAM.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Budget:
    """The memory available to a run, and where the figure comes from."""

    device: str  # cuda | mps | metal | cpu
    bytes: int | None
    source: str


def device_budget(backend: str, device: str) -> Budget:
    """The memory a run on ``device`` (through ``backend``) may use on this machine."""
    from tunelab.backends.hardware import describe_hardware

    if device == "metal":
        return Budget(device, _metal_working_set(), "Metal recommended working set")
    if device == "mps":
        return Budget(device, _mps_working_set(), "MPS recommended working set")
    hardware = describe_hardware()
    if device == "cuda":
        gpus = [g for g in hardware["gpus"] if g["api"] == "cuda"]
        if gpus:
            return Budget(device, int(gpus[0]["memory_bytes"]), f"{gpus[0]['name']} memory")
        return Budget(device, None, "no CUDA GPU visible here")
    memory = hardware["memory_bytes"]
    return Budget(device, int(memory) if memory else None, "system RAM")


def _metal_working_set() -> int | None:
    from tunelab.backends.mlx.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx

    info = (getattr(mx, "device_info", None) or mx.metal.device_info)()
    value = info.get("max_recommended_working_set_size") or info.get("memory_size")
    return int(value) if value else None


def _mps_working_set() -> int | None:
    import torch

    try:
        return int(torch.mps.recommended_max_memory())
    except (AttributeError, RuntimeError):
        return None
