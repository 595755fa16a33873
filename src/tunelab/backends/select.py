"""Choosing a backend for a config, and what each backend can do here (for `doctor`).

The decision is :func:`decide`, a pure function of an :class:`Environment`, so
every case (Mac with or without mlx, CUDA, CPU, missing packages) is testable
on any machine; :func:`detect_environment` builds the real one lazily, without
importing mlx-lm (2 s, and it would import mlx before a fast BLAS is loaded).
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from tunelab.backends.base import Backend
from tunelab.errors import BackendError
from tunelab.vocab import METHODS

TORCH_METHODS = METHODS
MLX_METHODS = tuple(m for m in METHODS if m not in ("prefix", "ia3"))  # mlx-lm has no prefix tuning or IA3
TORCH_INSTALL = 'install it with: pip install "tunelab[torch]"'
MLX_INSTALL = 'install it with: pip install "tunelab[mlx]"'

# What each backend implements in this version of tunelab (flip an entry when its backend gains it).
TORCH_FEATURES = {
    "compiled_step": True,  # CUDA: compiled decoder layers (the fast path); eager elsewhere
    "gradient_checkpointing": True,
    "quantized_bases": True,  # qlora through bitsandbytes (CUDA)
    "offload_activations": True,  # CUDA
}
MLX_FEATURES = {
    "compiled_step": True,
    "gradient_checkpointing": True,
    "quantized_bases": True,  # qlora through MLX affine quantization, and MLX-quantized checkpoints
    "offload_activations": False,
}


@dataclass(frozen=True)
class Choice:
    """The backend picked and, in one line, why."""

    name: str
    reason: str


@dataclass(frozen=True)
class Environment:
    """The facts about this machine that the choice depends on."""

    platform: str  # sys.platform: darwin, linux, win32
    machine: str  # platform.machine(): arm64, x86_64, aarch64
    has_torch: bool = False
    cuda: bool = False
    mps: bool = False
    has_mlx: bool = False
    has_mlx_lm: bool = False
    mlx_metal: bool = False
    mlx_lm_model_types: frozenset[str] = field(default_factory=frozenset)

    @property
    def apple_silicon(self) -> bool:
        return self.platform == "darwin" and self.machine == "arm64"

    @property
    def torch_device(self) -> str:
        return "cuda" if self.cuda else "mps" if self.mps else "cpu"

    @property
    def mlx_device(self) -> str:
        return "gpu" if self.mlx_metal else "cpu"


def choose_backend(
    requested: str, method: str, *, model_type: str | None = None, mlx_quantized: bool = False
) -> Choice:
    """Resolve ``backend: auto|torch|mlx`` to one that can run ``method`` (on ``model_type``) here.

    ``model_type`` is the checkpoint's ``config.json`` value (see
    :func:`model_type_of`); without it the architecture is not checked.
    ``mlx_quantized``: the checkpoint holds MLX-quantized weights (see
    :func:`is_mlx_quantized`), which only MLX loads.  torch is imported (~1 s)
    only when torch is the answer, since only then does its device appear in the reason.
    """
    # qlora's auto choice depends on CUDA (bitsandbytes' home), so probe torch for it up front.
    env = detect_environment(probe_torch=method == "qlora")
    choice = decide(env, requested, method, model_type, mlx_quantized=mlx_quantized)
    if choice.name == "torch" and method != "qlora":
        choice = decide(detect_environment(), requested, method, model_type, mlx_quantized=mlx_quantized)
    return choice


def decide(
    env: Environment, requested: str, method: str, model_type: str | None = None, *, mlx_quantized: bool = False
) -> Choice:
    """The whole policy: auto prefers MLX on Apple Silicon, torch elsewhere; MLX on a Linux CPU only on request."""
    if mlx_quantized and requested != "mlx":
        return _mlx_quantized_base(env, requested, method, model_type)
    if requested == "torch":
        _require_torch(env, method, why="backend: torch needs PyTorch")
        return Choice("torch", f"requested; torch on {env.torch_device}")
    if requested == "mlx":
        blocker = mlx_blocker(env, method, model_type)
        if blocker is not None:
            raise BackendError(
                f"backend: mlx can't run this config: {blocker.text}",
                hint="set backend: torch or auto" + (f"; or {blocker.fix}" if blocker.fix else ""),
            )
        return Choice("mlx", f"requested; mlx on {env.mlx_device}")
    if requested != "auto":
        raise BackendError(f"unknown backend {requested!r}", hint="set backend: auto, torch or mlx")
    if env.apple_silicon:
        blocker = mlx_blocker(env, method, model_type, need_metal=True)
        if blocker is None:
            return Choice("mlx", "auto: Apple Silicon with Metal; using mlx")
        fix = f"; or {blocker.fix}" if blocker.fix else ""
        _require_torch(env, method, why=f"auto: {blocker.text}, and torch is not installed either", hint=fix)
        return Choice("torch", f"auto: {blocker.text}; using torch on {env.torch_device}")
    if method == "qlora" and not env.cuda:
        return _qlora_without_cuda(env, model_type)
    _require_torch(env, method, why="auto: torch is the backend for this machine, but PyTorch is not installed")
    if env.cuda:
        return Choice("torch", "auto: NVIDIA GPU found; using torch on cuda")
    return Choice("torch", "auto: no Apple Silicon or NVIDIA GPU here; using torch on cpu")


def _qlora_without_cuda(env: Environment, model_type: str | None) -> Choice:
    """QLoRA off CUDA: bitsandbytes is CUDA-oriented, MLX quantizes on any CPU, so MLX it is."""
    blocker = mlx_blocker(env, "qlora", model_type)
    if blocker is None:
        return Choice("mlx", f"auto: qlora without an NVIDIA GPU; using mlx on {env.mlx_device}")
    raise BackendError(
        f"auto: method qlora needs a CUDA GPU (torch + bitsandbytes) or the MLX backend, and {blocker.text}",
        hint=(blocker.fix or "use a machine with an NVIDIA GPU") + "; or use method: lora",
    )


def _mlx_quantized_base(env: Environment, requested: str, method: str, model_type: str | None) -> Choice:
    """An MLX-quantized checkpoint: transformers can't load its weights, so only MLX will do."""
    convert = "or convert it for torch with: tunelab convert PATH --to hf --out NEW_PATH"
    if requested == "torch":
        raise BackendError("backend: torch can't load an MLX-quantized checkpoint", hint=f"set backend: mlx; {convert}")
    blocker = mlx_blocker(env, method, model_type)
    if blocker is not None:
        raise BackendError(
            f"auto: this checkpoint is MLX-quantized, which only mlx loads, and {blocker.text}",
            hint=(f"{blocker.fix}; " if blocker.fix else "") + convert,
        )
    return Choice("mlx", f"auto: MLX-quantized checkpoint; using mlx on {env.mlx_device}")


class Blocker(NamedTuple):
    """Why MLX can't serve a request (a phrase for reasons and messages) and what would fix it, if anything."""

    text: str
    fix: str = ""


def mlx_blocker(env: Environment, method: str, model_type: str | None, *, need_metal: bool = False) -> Blocker | None:
    """The first reason MLX can't serve this request here; None when it can."""
    if method not in MLX_METHODS:
        return Blocker(f"mlx can't run method {method}", f"choose a method mlx runs: {', '.join(MLX_METHODS)}")
    if not env.has_mlx:
        return Blocker("mlx is not installed", MLX_INSTALL)
    if not env.has_mlx_lm:
        return Blocker("mlx-lm is not installed", MLX_INSTALL)
    if need_metal and not env.mlx_metal:
        return Blocker("mlx has no Metal GPU here")
    if model_type is not None and model_type not in env.mlx_lm_model_types:
        return Blocker(f"mlx-lm has no model for architecture {model_type}", "upgrade mlx-lm if a newer one has it")
    return None


def _require_torch(env: Environment, method: str, *, why: str, hint: str = "") -> None:
    if not env.has_torch:
        raise BackendError(why, hint=TORCH_INSTALL + hint)
    if method not in TORCH_METHODS:
        raise BackendError(f"method {method} is not supported by the torch backend")


def detect_environment(*, probe_torch: bool = True) -> Environment:
    """This machine's facts; ``probe_torch`` imports torch to ask for CUDA/MPS (skip it to stay fast)."""
    import platform

    has_mlx = importlib.util.find_spec("mlx") is not None
    env = Environment(
        platform=sys.platform,
        machine=platform.machine(),
        has_torch=importlib.util.find_spec("torch") is not None,
        has_mlx=has_mlx,
        has_mlx_lm=importlib.util.find_spec("mlx_lm") is not None,
        mlx_metal=has_mlx and _mlx_metal(),
        mlx_lm_model_types=mlx_lm_model_types(),
    )
    if probe_torch and env.has_torch:
        cuda, mps = _torch_devices()
        env = replace(env, cuda=cuda, mps=mps)
    return env


@functools.cache
def _mlx_metal() -> bool:
    if sys.platform != "darwin":  # no Metal off macOS: don't import mlx just to hear "no"
        return False
    from tunelab.backends.mlx.blas import ensure_fast_blas

    ensure_fast_blas()
    import mlx.core as mx

    return bool(mx.metal.is_available())


@functools.cache
def _torch_devices() -> tuple[bool, bool]:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(torch.cuda.is_available()), bool(mps is not None and mps.is_available())


@functools.cache
def mlx_lm_model_types() -> frozenset[str]:
    """``model_type`` values mlx-lm can load: its ``models/`` modules plus its remapped names.

    Read from the installed files rather than imported: ``import mlx_lm`` takes
    ~2 s and imports mlx.core.
    """
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.submodule_search_locations:
        return frozenset()
    root = Path(next(iter(spec.submodule_search_locations)))
    modules = {p.stem for p in (root / "models").glob("*.py") if not p.stem.startswith("_")}
    remapped = {alias for alias, target in _mlx_lm_remapping(root).items() if target in modules}
    return frozenset(modules | remapped)


def _mlx_lm_remapping(root: Path) -> dict[str, str]:
    """``mlx_lm.utils.MODEL_REMAPPING`` (e.g. mistral → llama), read from source; {} if its shape changed."""
    loaded = sys.modules.get("mlx_lm.utils")
    if loaded is not None:
        return dict(getattr(loaded, "MODEL_REMAPPING", {}))
    try:
        tree = ast.parse((root / "utils.py").read_text(encoding="utf-8"))
    except (OSError, SyntaxError):
        return {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "MODEL_REMAPPING" for t in node.targets
        ):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                return {}
            return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}
    return {}


def model_type_of(path_or_folder: str | Path) -> str | None:
    """The ``model_type`` in a local checkpoint's config.json; None for hub ids (nothing is downloaded)."""
    folder = Path(path_or_folder).expanduser()
    if folder.is_file():
        folder = folder.parent
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = config.get("model_type") if isinstance(config, dict) else None
    return value if isinstance(value, str) and value else None


def is_mlx_quantized(path_or_folder: str | Path) -> bool:
    """Whether a local checkpoint's config.json has MLX's ``quantization`` block (False for hub ids)."""
    folder = Path(path_or_folder).expanduser()
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("quantization"), dict)


def capabilities(env: Environment) -> list[dict[str, Any]]:
    """Per backend: usable here?, devices, methods and options — the table `tunelab doctor` prints."""
    torch_devices = (["cuda"] if env.cuda else []) + (["mps"] if env.mps else []) + ["cpu"]
    mlx_ok = env.has_mlx and env.has_mlx_lm
    torch_cuda = env.has_torch and env.cuda
    mlx_missing = [name for name, ok in (("mlx", env.has_mlx), ("mlx-lm", env.has_mlx_lm)) if not ok]
    return [
        {
            "backend": "torch",
            "available": env.has_torch,
            "devices": torch_devices if env.has_torch else [],
            "methods": list(TORCH_METHODS),
            "options": {**TORCH_FEATURES, "compiled_step": torch_cuda, "bf16": torch_cuda},
            "note": "" if env.has_torch else TORCH_INSTALL,
        },
        {
            "backend": "mlx",
            "available": mlx_ok,
            "devices": (["gpu", "cpu"] if env.mlx_metal else ["cpu"]) if mlx_ok else [],
            "methods": list(MLX_METHODS),
            "options": {**MLX_FEATURES, "bf16": mlx_ok and env.mlx_metal},
            "note": _mlx_note(env, mlx_missing),
        },
    ]


def _mlx_note(env: Environment, missing: list[str]) -> str:
    if missing:
        return f"{' and '.join(missing)} not installed: {MLX_INSTALL}"
    if not env.apple_silicon:
        return "CPU only here: used when a config sets backend: mlx"
    return ""


def make_backend(choice: Choice) -> Backend:
    """Instantiate the chosen backend (imports its framework only now)."""
    if choice.name == "torch":
        from tunelab.backends.torch.backend import TorchBackend

        return TorchBackend()
    if choice.name == "mlx":
        from tunelab.backends.mlx.blas import ensure_fast_blas

        ensure_fast_blas()  # must precede the first import of mlx.core in this process
        from tunelab.backends.mlx.backend import MlxBackend

        return MlxBackend()
    raise BackendError(f"unknown backend {choice.name}")
