"""The MLX backend (Apple Silicon GPU via Metal; CPU anywhere with ``mlx[cpu]``).

Importing this package loads a fast BLAS for MLX on Linux (see :mod:`.blas`).
That is deliberate work at import time: it has to happen before the first
``import mlx.core`` in the process, and every module of this package may import
mlx at its top, so the package's own ``__init__`` is the one place that is sure
to run first.  It loads nothing when mlx is absent, on macOS, or with
``TUNELAB_BLAS=reference``.
"""

from tunelab.backends.mlx.blas import ensure_fast_blas

ensure_fast_blas()
