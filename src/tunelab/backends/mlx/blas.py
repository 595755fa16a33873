"""Give MLX a fast BLAS on Linux before it binds to its slow bundled one.

Why this exists: the ``mlx[cpu]`` wheels for Linux ship the reference (netlib)
BLAS, so every CPU matmul runs at a few GFLOP/s (~6 GFLOP/s for a 1024² fp32
matmul, measured) — training a tiny model becomes minutes instead of seconds.
``libmlx.so`` resolves ``cblas_*`` through the dynamic linker, and the global
symbol scope is searched before a library's own dependencies; so loading an
optimised BLAS with ``RTLD_GLOBAL`` *before the first* ``import mlx.core``
makes MLX call it instead (~50x faster here with Debian's OpenBLAS).  Loading
it afterwards changes nothing: the symbols are already bound.

macOS needs none of this (MLX uses Accelerate and Metal).  Control it with
``TUNELAB_BLAS``: a path to a CBLAS library to load instead of searching, or
``reference`` to keep MLX's bundled BLAS.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import BackendError

ENV_VAR = "TUNELAB_BLAS"
FIX_HINT = f"install OpenBLAS (apt-get install libopenblas0-pthread) or set {ENV_VAR}=/path/to/libopenblas.so.0"

# LP64 (32-bit int) CBLAS builds only: MLX calls cblas_sgemm with int sizes, so ILP64 builds must not be used.
_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/{triplet}/openblas-pthread/libopenblas.so.0",
    "/usr/lib/{triplet}/openblas-openmp/libopenblas.so.0",
    "/usr/lib/{triplet}/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "{prefix}/lib/libopenblas.so.0",
    "{prefix}/lib/libmkl_rt.so.2",
    "{prefix}/lib/libmkl_rt.so",
    "/opt/intel/oneapi/mkl/latest/lib/libmkl_rt.so.2",
    "/opt/intel/oneapi/mkl/latest/lib/intel64/libmkl_rt.so",
    "/usr/lib/{triplet}/libmkl_rt.so",
)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's CPU matmuls use in this process, and why."""

    name: str  # openblas | mkl | accelerate | reference | none | unknown | <file name>
    path: str | None
    loaded: bool  # a fast BLAS is in the global scope, ahead of MLX's bundled one
    why: str

    @property
    def is_reference(self) -> bool:
        """True when MLX is (or will be) left with its slow bundled BLAS."""
        return self.name == "reference"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INFO: BlasInfo | None = None


def ensure_fast_blas() -> BlasInfo:
    """Load an optimised CBLAS globally before MLX is imported (once per process; later calls return the first answer).

    Raises :class:`BackendError` only when ``TUNELAB_BLAS`` names a library that
    can't be loaded: the user asked for it, so silently running 50x slower
    would hide their mistake.
    """
    global _INFO
    if _INFO is None:
        _INFO = _decide()
    return _INFO


def _decide() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo("accelerate", None, False, "macOS: MLX uses Accelerate and Metal")
    if not sys.platform.startswith("linux"):
        return BlasInfo("unknown", None, False, f"{sys.platform}: tunelab only picks a BLAS for MLX on Linux")
    if importlib.util.find_spec("mlx") is None:
        return BlasInfo("none", None, False, "mlx is not installed")
    setting = os.environ.get(ENV_VAR, "").strip()
    if setting.lower() == "reference":
        return BlasInfo("reference", None, False, f"{ENV_VAR}=reference: MLX keeps its bundled netlib BLAS")
    if "mlx.core" in sys.modules:
        return _in_effect("mlx.core was imported before tunelab could choose a BLAS")
    present = _global_cblas_path()
    if present is not None:
        return BlasInfo(_name_of(present), present, True, f"{present} is already loaded globally (e.g. LD_PRELOAD)")
    if setting:
        return _load_explicit(setting)
    for path in candidate_paths():
        if Path(path).is_file():
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            return BlasInfo(_name_of(path), path, True, "loaded before mlx, so MLX's CPU matmuls use it")
    return BlasInfo("reference", None, False, "no OpenBLAS or MKL found: MLX uses its bundled netlib BLAS")


def _load_explicit(path: str) -> BlasInfo:
    try:
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise BackendError(
            f"{ENV_VAR}={path}: the library can't be loaded ({exc})",
            hint=f"point {ENV_VAR} at an existing CBLAS library (e.g. libopenblas.so.0), or unset it",
        ) from exc
    if not hasattr(lib, "cblas_sgemm"):
        raise BackendError(
            f"{ENV_VAR}={path}: the library has no cblas_sgemm, so MLX can't use it",
            hint=f"point {ENV_VAR} at a CBLAS library such as libopenblas.so.0 or libmkl_rt.so, or unset it",
        )
    return BlasInfo(_name_of(path), path, True, f"{ENV_VAR}={path}: loaded before mlx")


def _in_effect(context: str) -> BlasInfo:
    """Report, without loading anything, which CBLAS the global scope offers MLX now."""
    path = _global_cblas_path()
    if path is None:
        return BlasInfo("reference", None, False, f"{context}; MLX uses its bundled netlib BLAS")
    return BlasInfo(_name_of(path), path, True, f"{context}; {path} was already loaded globally")


def candidate_paths() -> list[str]:
    """Where an optimised LP64 CBLAS is commonly installed on this architecture, in order of preference."""
    machine = platform.machine().lower()
    triplet = "aarch64-linux-gnu" if machine in ("aarch64", "arm64") else f"{machine}-linux-gnu"
    seen: dict[str, None] = {}
    for pattern in _CANDIDATES:
        seen.setdefault(pattern.format(triplet=triplet, prefix=sys.prefix), None)
    return list(seen)


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _global_cblas_path() -> str | None:
    """The file that provides ``cblas_sgemm`` in the global symbol scope, or None (glibc's dladdr)."""
    try:
        scope = ctypes.CDLL(None)  # dlopen(NULL): lookups search the global scope, as MLX's would
        address = ctypes.cast(scope.cblas_sgemm, ctypes.c_void_p).value
        info = _DlInfo()
        if not scope.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) or not info.dli_fname:
            return "unknown library"
        return os.fsdecode(info.dli_fname)
    except (AttributeError, OSError):
        return None


def serving_library() -> str | None:
    """The file whose ``cblas_sgemm`` MLX's CPU matmuls call in this process (None: mlx is not loaded).

    The global scope is searched first, so a library found there (dladdr) serves MLX; otherwise
    MLX binds to the BLAS it bundles, which /proc/self/maps shows once mlx.core is loaded.  This
    is the fact behind doctor's warning, not a speed: a busy machine makes any BLAS look slow.
    """
    found = _global_cblas_path()
    if found is not None:
        return found
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as fh:
            mapped = {line.split(maxsplit=5)[-1].strip() for line in fh if "/" in line}
    except OSError:
        return None
    return next((path for path in sorted(mapped) if os.path.basename(path).lower().startswith("libblas")), None)


def is_reference_library(path: str | None) -> bool:
    """True for the netlib BLAS the mlx wheels bundle (or none at all): the slow one."""
    return path is None or os.path.basename(path).lower().startswith("libblas")


def _name_of(path: str) -> str:
    base = os.path.basename(path).lower()
    if "openblas" in base:
        return "openblas"
    if "mkl" in base:
        return "mkl"
    if "blis" in base:
        return "blis"
    return base or "unknown"


def measure_matmul_gflops(n: int = 512, reps: int | None = None) -> float:
    """Best-of fp32 ``n×n`` matmul throughput of MLX's default device, in GFLOP/s (well under a second).

    Calls :func:`ensure_fast_blas` first, since this may be the first import of
    mlx in the process.  With ``reps`` unset it repeats for ~0.2 s (at most 50
    times): the reference BLAS needs ~40 ms per 512² matmul, OpenBLAS ~1 ms.
    """
    ensure_fast_blas()
    import mlx.core as mx

    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b, a @ b)  # warm-up: thread pools, allocations
    limit, deadline = (reps, float("inf")) if reps is not None else (50, time.perf_counter() + 0.2)
    times: list[float] = []
    while len(times) < max(1, limit) and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        mx.eval(a @ b)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9


__all__ = [
    "ENV_VAR",
    "FIX_HINT",
    "BlasInfo",
    "candidate_paths",
    "ensure_fast_blas",
    "is_reference_library",
    "measure_matmul_gflops",
    "serving_library",
]
