"""LoRA initial weights drawn the same way on every backend.

PEFT initialises ``lora_A`` with Kaiming-uniform (a = sqrt(5)), i.e. uniform in
±1/sqrt(fan_in), and ``lora_B`` with zeros.  Drawing ``A`` from numpy, seeded by
the run's seed and the module's HF path, gives torch and MLX the very same
starting adapter, so one config reproduces across backends.
"""

from __future__ import annotations

import zlib

import numpy as np


def lora_a_init(seed: int, module_path: str, rank: int, fan_in: int) -> np.ndarray:
    """The ``(rank, fan_in)`` float32 matrix ``lora_A`` starts from for ``module_path``."""
    rng = np.random.default_rng([seed, zlib.crc32(module_path.encode("utf-8"))])
    bound = 1.0 / np.sqrt(fan_in)
    return rng.uniform(-bound, bound, size=(rank, fan_in)).astype(np.float32)
