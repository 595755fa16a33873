"""Both joined products (:mod:`joined_b`'s B beside W, :mod:`joined_a`'s A below it): PEFT's losses and gradients
across optimizer steps, one compiled graph for all layers, the base alone with the adapters off, and bf16 runs no
further from fp32 than PEFT's."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch
from tests.backends.conftest import (
    assert_same_loss_and_grads,
    assert_switched_off_adapters_give_the_base,
    compiled_runs,
    load_backend,
    two_steps,
)

from tunelab.backends.torch import joined_a, joined_b


@dataclass(frozen=True)
class Variant:
    switch: ModuleType  # the module whose ON joins
    adapters: tuple[str, ...]  # gradients that must be among the compared ones


VARIANTS = {
    "b_gate_up": (Variant(joined_b, ("up_proj.lora_B",)), ("mlp",)),
    "b_and_qkv": (Variant(joined_b, ("up_proj.lora_B", "v_proj.lora_B")), ("mlp", "self_attn")),
    "a": (Variant(joined_a, ("down_proj.lora_A", "o_proj.lora_B")), ("mlp",)),
}


@pytest.fixture(params=list(VARIANTS))
def variant(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Variant:
    chosen, groups = VARIANTS[request.param]
    monkeypatch.setattr(joined_b, "GROUPS", groups)
    return chosen


def _load(
    variant: Variant, folder: Path, tokenizer: Any, joined: bool, dtype: str = "float32", device: str = "cpu"
) -> Any:
    return load_backend(folder, tokenizer, device=device, dtype=dtype, switches=((variant.switch, joined),))


def _same(variant: Variant, a: tuple, b: tuple, tol: float = 1e-5) -> None:
    for adapter in variant.adapters:
        assert_same_loss_and_grads(a, b, adapter, tol)


@pytest.mark.parametrize(("checkpoints", "fused"), [(False, False), (True, False), (False, True)])
def test_joined_products_give_peft_s_losses_and_gradients(
    variant: Variant, tiny_model_dir: Path, tiny_tokenizer: Any, checkpoints: bool, fused: bool
) -> None:
    plain, joined = (
        two_steps(_load(variant, tiny_model_dir, tiny_tokenizer, on), checkpoints=checkpoints, fused=fused)
        for on in (False, True)
    )
    _same(variant, joined, plain)


def test_compiled_layers_join_in_one_graph(
    variant: Variant, tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # a thread count change recompiles too
    runs, graphs = compiled_runs(lambda on: _load(variant, tiny_model_dir, tiny_tokenizer, on))
    _same(variant, runs[1], runs[0])
    assert graphs[1] == graphs[0]  # joining adds no graph (a graph per layer would be one per layer)


def test_switched_off_adapters_give_the_base_s_output(
    variant: Variant, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    """A preference objective's reference model: the adapters off, the joined weights unread."""
    assert_switched_off_adapters_give_the_base(_load(variant, tiny_model_dir, tiny_tokenizer, True), tiny_model_dir)


def _no_further_from_fp32(variant: Variant, device: str, compiled: str | None, folder: Path, tokenizer: Any) -> None:
    """As on a GPU: a bf16 base, fp32 adapters, autocast to bf16.  Two bf16 runs that round in other places
    differ by more than a fixed tolerance in a few elements, so each is measured against an fp32 run."""
    runs = {}
    for name, joined, dtype in (("fp32", False, "float32"), ("peft", False, "bfloat16"), ("joined", True, "bfloat16")):
        torch._dynamo.reset()
        backend = _load(variant, folder, tokenizer, joined, dtype=dtype, device=device)
        backend._autocast = torch.bfloat16 if dtype == "bfloat16" else None  # what a CUDA load sets
        runs[name] = two_steps(backend, compiled=None if dtype == "float32" else compiled, checkpoints=True)
    torch._dynamo.reset()
    reference, peft, joined = runs["fp32"], runs["peft"], runs["joined"]
    for ref, p, j in zip(reference[0], peft[0], joined[0], strict=True):
        assert abs(j - ref) <= 2 * abs(p - ref) + 1e-4 * abs(ref)
    assert joined[1].keys() == reference[1].keys()
    assert all(any(a in n for n in reference[1]) for a in variant.adapters)
    for name, grad in reference[1].items():
        own = float((peft[1][name].float() - grad).abs().max())
        theirs = float((joined[1][name].float() - grad).abs().max())
        assert theirs <= 2 * own + 1e-3 * float(grad.abs().max()), name


def test_in_bf16_it_is_no_further_from_fp32_than_peft(
    variant: Variant, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    _no_further_from_fp32(variant, "cpu", None, tiny_model_dir, tiny_tokenizer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_inductor_on_cuda_in_bf16_is_no_further_from_fp32_than_peft(
    variant: Variant, tiny_model_dir: Path, tiny_tokenizer: Any
) -> None:
    _no_further_from_fp32(variant, "cuda", "inductor", tiny_model_dir, tiny_tokenizer)
