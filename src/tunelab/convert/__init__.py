"""Checkpoints between the Hugging Face and the mlx-lm layouts (``tunelab convert``).

Importing this package is free: mlx, mlx-lm and torch load inside the functions that need them.
"""

from tunelab.convert.checkpoint import (
    GROUP_SIZES,
    QUANT_BITS,
    TARGETS,
    VERIFIED_HF_ROUND_TRIP,
    ConvertResult,
    convert_checkpoint,
    mlx_model_types,
)
from tunelab.convert.files import DTYPES

__all__ = [
    "DTYPES",
    "GROUP_SIZES",
    "QUANT_BITS",
    "TARGETS",
    "VERIFIED_HF_ROUND_TRIP",
    "ConvertResult",
    "convert_checkpoint",
    "mlx_model_types",
]
