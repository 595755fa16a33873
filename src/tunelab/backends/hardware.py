"""What this machine is and what tunelab can do on it: the facts behind `tunelab doctor`.

Gathered with the standard library (no psutil) and package metadata, so a
report costs about a second — torch is imported only when it is installed, to
ask about CUDA/MPS, and mlx only for the BLAS check on Linux.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import BackendError

BACKEND_PACKAGES = ("torch", "transformers", "peft", "mlx", "mlx-lm", "bitsandbytes")


def describe_hardware() -> dict[str, Any]:
    """OS, CPU, cores, memory, GPUs and Python version of this machine."""
    return {
        "os": f"{platform.system()} {platform.release()}",
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "gpus": _gpus(),
        "python": platform.python_version(),
    }


def installed_backends() -> dict[str, str | None]:
    """Installed versions of the packages backends need (None when missing), from metadata only."""
    versions: dict[str, str | None] = {}
    for name in BACKEND_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def doctor_report(*, measure: bool = True) -> dict[str, Any]:
    """Everything `tunelab doctor` shows: hardware, packages, the auto choice, capabilities, MLX's BLAS.

    The BLAS section comes first because it may load a library that must
    precede the first import of mlx in this process.
    """
    from tunelab.backends.select import capabilities, decide, detect_environment

    blas = mlx_blas_report(measure=measure)
    env = detect_environment()
    try:
        choice = decide(env, "auto", "lora")
        auto: dict[str, Any] = {"backend": choice.name, "reason": choice.reason}
    except BackendError as exc:
        auto = {"backend": None, "reason": str(exc)}
    return {
        "hardware": describe_hardware(),
        "installed": installed_backends(),
        "auto": auto,
        "capabilities": capabilities(env),
        "mlx_blas": blas,
    }


def mlx_blas_report(*, measure: bool = True) -> dict[str, Any] | None:
    """On Linux with mlx installed: the BLAS MLX uses, its measured matmul speed and a fix if it is slow."""
    if not sys.platform.startswith("linux") or importlib.util.find_spec("mlx") is None:
        return None
    try:
        from tunelab.backends.mlx.blas import FIX_HINT, ensure_fast_blas, is_reference_library, serving_library

        info = ensure_fast_blas()
    except BackendError as exc:
        return {
            "name": None,
            "path": None,
            "loaded": False,
            "why": exc.message,
            "gflops": None,
            "served_by": None,
            "warning": exc.hint,
        }
    report: dict[str, Any] = {**info.to_dict(), "gflops": None, "served_by": None, "warning": None}
    if measure:
        from tunelab.backends.mlx.blas import measure_matmul_gflops

        report["gflops"] = round(measure_matmul_gflops(512), 1)  # a figure to read, never a verdict: load skews it
    served = serving_library()
    report["served_by"] = served
    # The verdict comes from which library answers cblas_sgemm, or (mlx not loaded yet) from the choice made.
    if info.is_reference if served is None else is_reference_library(served):
        report["warning"] = f"MLX's CPU matmuls run on a slow reference BLAS: {FIX_HINT}"
    return report


def _cpu_name() -> str:
    if sys.platform == "darwin":
        name = _run(["sysctl", "-n", "machdep.cpu.brand_string"])
        if name:
            return name
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for key in ("model name", "Model", "Hardware", "cpu model"):  # x86, then common ARM/other spellings
        for line in text.splitlines():
            label, _, value = line.partition(":")
            if label.strip() == key and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or "unknown"


def _memory_bytes() -> int | None:
    if sys.platform == "darwin":
        out = _run(["sysctl", "-n", "hw.memsize"])
        if out.isdigit():
            return int(out)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, OSError, ValueError):
        pass
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _gpus() -> list[dict[str, Any]]:
    """CUDA devices (through torch, if it sees any) and the Apple GPU (through mlx, on macOS)."""
    from tunelab.backends.select import detect_environment

    env = detect_environment()
    gpus: list[dict[str, Any]] = []
    if env.cuda:
        import torch

        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append({"name": props.name, "memory_bytes": int(props.total_memory), "api": "cuda"})
    if env.mlx_metal:
        import mlx.core as mx

        info = (getattr(mx, "device_info", None) or mx.metal.device_info)()
        gpus.append(
            {"name": str(info.get("device_name", "Apple GPU")), "memory_bytes": info.get("memory_size"), "api": "metal"}
        )
    return gpus


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=5, check=False).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


__all__ = ["describe_hardware", "doctor_report", "installed_backends", "mlx_blas_report"]
