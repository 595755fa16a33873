"""`backend: auto|torch|mlx` resolves to the documented backend, with a reason, on every kind of machine.

The policy is a pure function of an :class:`Environment`, so Macs, CUDA boxes
and missing packages are all covered here without the hardware.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import replace
from pathlib import Path

import pytest

from tunelab.backends.select import Environment, capabilities, decide, mlx_lm_model_types, model_type_of
from tunelab.errors import BackendError

ARCHS = frozenset({"llama", "qwen2", "mistral"})
MAC = Environment(
    "darwin", "arm64", has_torch=True, mps=True, has_mlx=True, has_mlx_lm=True, mlx_metal=True, mlx_lm_model_types=ARCHS
)
MAC_NO_MLX = replace(MAC, has_mlx=False, has_mlx_lm=False, mlx_metal=False, mlx_lm_model_types=frozenset())
LINUX_CPU = Environment("linux", "x86_64", has_torch=True, has_mlx=True, has_mlx_lm=True, mlx_lm_model_types=ARCHS)
LINUX_CUDA = replace(LINUX_CPU, cuda=True)
LINUX_BARE = Environment("linux", "x86_64")


@pytest.mark.parametrize(
    ("env", "requested", "method", "model_type", "backend", "reason"),
    [
        (MAC, "auto", "lora", "llama", "mlx", "auto: Apple Silicon with Metal; using mlx"),
        (MAC, "auto", "dora", None, "mlx", "auto: Apple Silicon with Metal; using mlx"),
        (MAC_NO_MLX, "auto", "lora", None, "torch", "auto: mlx is not installed; using torch on mps"),
        (replace(MAC, has_mlx_lm=False), "auto", "lora", None, "torch", "auto: mlx-lm is not installed; using torch"),
        (MAC, "auto", "ia3", None, "torch", "auto: mlx can't run method ia3; using torch on mps"),
        (MAC, "auto", "prefix", "llama", "torch", "auto: mlx can't run method prefix; using torch on mps"),
        (MAC, "auto", "lora", "bert", "torch", "auto: mlx-lm has no model for architecture bert; using torch on mps"),
        (replace(MAC, mlx_metal=False), "auto", "lora", None, "torch", "auto: mlx has no Metal GPU here; using torch"),
        (MAC, "torch", "lora", None, "torch", "requested; torch on mps"),
        (MAC, "mlx", "full", "mistral", "mlx", "requested; mlx on gpu"),
        (LINUX_CUDA, "auto", "lora", None, "torch", "auto: NVIDIA GPU found; using torch on cuda"),
        (LINUX_CPU, "auto", "lora", "llama", "torch", "auto: no Apple Silicon or NVIDIA GPU here; using torch on cpu"),
        (LINUX_CPU, "mlx", "lora", "llama", "mlx", "requested; mlx on cpu"),
        (LINUX_CPU, "mlx", "freeze", None, "mlx", "requested; mlx on cpu"),
    ],
)
def test_choice_and_reason(
    env: Environment, requested: str, method: str, model_type: str | None, backend: str, reason: str
) -> None:
    choice = decide(env, requested, method, model_type)
    assert (choice.name, choice.reason[: len(reason)]) == (backend, reason)


@pytest.mark.parametrize(
    ("env", "requested", "method", "model_type", "message", "hint"),
    [
        (MAC_NO_MLX, "mlx", "lora", None, "mlx is not installed", "set backend: torch or auto"),
        (LINUX_BARE, "mlx", "lora", None, "mlx is not installed", 'pip install "tunelab[mlx]"'),
        (MAC, "mlx", "ia3", None, "mlx can't run method ia3", "set backend: torch or auto"),
        (LINUX_CPU, "mlx", "prefix", None, "method prefix", "lora, dora, qlora, full, freeze"),
        (LINUX_CPU, "mlx", "lora", "bert", "architecture bert", "set backend: torch or auto"),
        (LINUX_BARE, "auto", "lora", None, "PyTorch is not installed", 'pip install "tunelab[torch]"'),
        (replace(LINUX_CPU, has_torch=False), "torch", "lora", None, "PyTorch", 'pip install "tunelab[torch]"'),
        (replace(MAC_NO_MLX, has_torch=False), "auto", "lora", None, "mlx is not installed", "tunelab[mlx]"),
        (MAC, "jax", "lora", None, "unknown backend", "auto, torch or mlx"),
    ],
)
def test_refusals_say_what_to_change(
    env: Environment, requested: str, method: str, model_type: str | None, message: str, hint: str
) -> None:
    with pytest.raises(BackendError) as err:
        decide(env, requested, method, model_type)
    assert message in err.value.message
    assert err.value.hint is not None and hint in err.value.hint


def test_capabilities_describe_both_backends() -> None:
    table = {row["backend"]: row for row in capabilities(MAC)}
    assert table["mlx"]["available"] and table["mlx"]["devices"] == ["gpu", "cpu"]
    assert "ia3" not in table["mlx"]["methods"] and "ia3" in table["torch"]["methods"]
    assert table["torch"]["devices"] == ["mps", "cpu"]
    bare = {row["backend"]: row for row in capabilities(LINUX_BARE)}
    assert not bare["torch"]["available"] and "tunelab[torch]" in bare["torch"]["note"]
    assert not bare["mlx"]["available"] and "tunelab[mlx]" in bare["mlx"]["note"]


def test_model_type_of_reads_a_local_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "architectures": ["X"]}))
    assert model_type_of(tmp_path) == "qwen2"
    assert model_type_of(str(tmp_path / "config.json")) == "qwen2"
    assert model_type_of(tmp_path / "missing") is None
    assert model_type_of("Qwen/Qwen2.5-0.5B-Instruct") is None  # a hub id: never downloaded here


@pytest.mark.skipif(importlib.util.find_spec("mlx_lm") is None, reason="mlx-lm is not installed")
def test_mlx_lm_architectures_include_remapped_names() -> None:
    types = mlx_lm_model_types()
    assert {"llama", "qwen2", "mistral"} <= types  # mistral is served by mlx-lm's llama via its remapping
    assert "bert" not in types
