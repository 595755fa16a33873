"""The CUDA fast path's host-side pieces, which run everywhere: padding, selection, switches.

The kernels themselves (compiled layers, PyTorch's varlen attention) need a GPU
and are checked in ``tests/integration/test_cuda_fast.py``.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec  # noqa: E402
from tunelab.backends.torch.backend import TorchBackend  # noqa: E402
from tunelab.backends.torch.fast import SHAPE_MULTIPLE, resolve, round_up  # noqa: E402
from tunelab.backends.torch.linear_ce import _chunk_loss_grad  # noqa: E402
from tunelab.backends.torch.loss import supervised_positions  # noqa: E402
from tunelab.backends.torch.shapes import compiled_width, pad_to_multiple, right_padded, widest_row  # noqa: E402
from tunelab.config.load import validate_config  # noqa: E402
from tunelab.data.packing import collate_packed  # noqa: E402
from tunelab.data.tokenize import TokenizedSplit  # noqa: E402
from tunelab.errors import ConfigError  # noqa: E402
from tunelab.vocab import IGNORE  # noqa: E402


def _batch(rng: np.random.Generator, lengths: list[int], width: int) -> dict[str, np.ndarray]:
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, IGNORE)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(3, 200, size=n)
        mask[row, :n] = 1
        labels[row, n // 2 : n] = ids[row, n // 2 : n]  # a prompt half that is masked
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_round_up_and_resolve_on_cpu() -> None:
    assert [round_up(n) for n in (1, SHAPE_MULTIPLE, SHAPE_MULTIPLE + 1)] == [SHAPE_MULTIPLE, SHAPE_MULTIPLE, 2 * 128]
    fast = resolve(torch.device("cpu"), compile=True, fused_loss=True, activation_budget=0.5)
    assert not fast.compile_layers  # compiled layers are a CUDA feature
    assert fast.fused_loss and fast.parts == ["fused loss"]


def test_supervised_positions_match_a_boolean_mask() -> None:
    labels = np.array([[IGNORE, 5, IGNORE, 7], [1, IGNORE, 2, 3]])
    shifted = labels[:, 1:]
    assert supervised_positions(labels).tolist() == np.flatnonzero(shifted != IGNORE).tolist() == [0, 2, 4, 5]


def test_padding_to_a_multiple_keeps_every_array_aligned() -> None:
    rng = np.random.default_rng(0)
    batch = _batch(rng, [30, 70], 70)
    padded = pad_to_multiple(batch)
    assert {k: v.shape for k, v in padded.items()} == {k: (2, 128) for k in batch}
    for key, value in batch.items():
        np.testing.assert_array_equal(padded[key][:, :70], value)
    assert (padded["labels"][:, 70:] == IGNORE).all() and (padded["attention_mask"][:, 70:] == 0).all()
    assert pad_to_multiple(padded) is padded  # already a multiple: untouched


def test_packed_padding_tail_is_a_sequence_of_its_own() -> None:
    split = TokenizedSplit(input_ids=[np.arange(3, 63), np.arange(3, 43)], labels=[np.arange(3, 63), np.arange(3, 43)])
    batch = collate_packed(split, [np.array([0, 1])], 0)  # one full row of 100 tokens
    padded = pad_to_multiple(batch)
    assert padded["position_ids"][0, 100:].tolist() == list(range(28))
    assert (padded["segment_ids"][0, 100:] == 0).all()


def test_padded_batch_gives_the_same_loss(tiny_model_dir: Path, tiny_tokenizer: object) -> None:
    """What the compiled path feeds (padded to a multiple) scores exactly what the unpadded batch does."""
    backend = TorchBackend()
    backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"), MethodSpec(), OptimSpec(), None)
    rng = np.random.default_rng(1)
    batch = _batch(rng, [40, 90, 17], 90)
    plain, padded = backend.eval_loss(batch), backend.eval_loss(pad_to_multiple(batch))
    assert plain.tokens == padded.tokens
    assert abs(plain.loss_sum - padded.loss_sum) <= 1e-5 * plain.loss_sum


def test_batches_near_the_longest_row_share_its_compiled_length() -> None:
    widest = widest_row(ModelSpec("m", longest_row=615))
    assert widest == 5 * SHAPE_MULTIPLE
    assert compiled_width(615, widest) == compiled_width(400, widest) == widest  # 512 -> 640: one shape
    assert compiled_width(300, widest) == 3 * SHAPE_MULTIPLE  # a much shorter batch keeps its own
    assert compiled_width(300, None) == 3 * SHAPE_MULTIPLE
    assert widest_row(ModelSpec("m", longest_row=615, packing=True)) is None  # packed: the pack length
    assert widest_row(ModelSpec("m")) is None


def test_only_right_padding_counts_as_maskless() -> None:
    assert right_padded(np.array([[1, 1, 1], [1, 1, 0], [1, 0, 0]]))
    assert not right_padded(np.array([[1, 1, 1], [0, 1, 1]]))  # left padding keeps its mask
    assert not right_padded(np.array([[1, 0, 1]]))  # so does a hole


def test_a_right_padded_batch_scores_each_row_as_it_would_alone(tiny_model_dir: Path) -> None:
    """The padded batch runs without a mask; no real token may see a pad, so each row's loss is its own."""
    backend = TorchBackend()
    backend.load(ModelSpec(str(tiny_model_dir), dtype="float32", device="cpu"), MethodSpec(), OptimSpec(), None)
    batch = _batch(np.random.default_rng(2), [40, 90, 17], 90)
    whole = backend.eval_loss(batch)
    rows = [{k: v[row : row + 1, :n] for k, v in batch.items()} for row, n in enumerate([40, 90, 17])]
    alone = [backend.eval_loss(row) for row in rows]
    assert whole.tokens == sum(part.tokens for part in alone)
    assert abs(whole.loss_sum - sum(part.loss_sum for part in alone)) <= 1e-5 * whole.loss_sum


@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_chunk_loss_and_gradient_are_cross_entropy(softcap: float) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 50, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 50, (16,))
    loss, grad = _chunk_loss_grad(logits.detach(), labels, softcap, True)
    capped = torch.tanh(logits / softcap) * softcap if softcap else logits
    reference = torch.nn.functional.cross_entropy(capped, labels, reduction="sum")
    reference.backward()
    assert grad is not None and logits.grad is not None
    assert torch.allclose(loss, reference) and torch.allclose(grad, logits.grad)
    assert _chunk_loss_grad(logits.detach(), labels, softcap, False)[1] is None


def test_fast_path_switches_are_validated() -> None:
    base = {"model": {"path": "m"}, "data": {"train": "d.jsonl"}}
    cfg = validate_config({**base, "train": {"compile": False, "fused_loss": False, "activation_budget": 0.5}})
    assert (cfg.train.compile, cfg.train.fused_loss, cfg.train.activation_budget) == (False, False, 0.5)
    assert validate_config(base).train.activation_budget == 0.8
    with pytest.raises(ConfigError, match="activation_budget"):
        validate_config({**base, "train": {"activation_budget": 0}})


def test_torch_varlen_is_chosen_only_where_its_kernel_applies() -> None:
    """PyTorch's flash varlen kernel: half precision, no soft-capped scores; fp32 models keep the exact path."""
    pytest.importorskip("torch.nn.attention.varlen")
    from transformers import AutoConfig, AutoModelForCausalLM

    from tunelab.backends.torch.attention import torch_varlen_usable

    def model(dtype: object, **extra: object) -> object:
        config = AutoConfig.for_model(
            "llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=4, num_key_value_heads=2, **extra,
        )  # fmt: skip
        return AutoModelForCausalLM.from_config(config, dtype=dtype)

    assert torch_varlen_usable(model(torch.bfloat16))
    assert torch_varlen_usable(model(torch.float16))
    assert not torch_varlen_usable(model(torch.float32))  # the kernel is half precision only
    capped = AutoConfig.for_model(
        "gemma2",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
    )
    gemma2 = AutoModelForCausalLM.from_config(capped, dtype=torch.bfloat16)
    assert capped.attn_logit_softcapping and not torch_varlen_usable(gemma2)


def test_wide_rows_reduce_in_one_pass_where_inductor_would_loop(torch_config: Callable[..., None]) -> None:
    """fast.persist_rows_up_to installs inductor's heuristics hook: an INNER reduction of up to N elements is
    persistent (one read of the row), a wider one keeps inductor's own choice, and a graph cached before it
    is not reused."""
    from torch._inductor import config as inductor_config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    from tunelab.backends.torch.fast import persist_rows_up_to

    class Features:
        def __init__(self, numel: int, hint: ReductionHint = ReductionHint.INNER) -> None:
            self.reduction_numel, self.hint = numel, hint

        def get_reduction_hint(self) -> ReductionHint:
            return self.hint

    class Sizes:
        @staticmethod
        def statically_known_leq(a: int, b: int) -> bool:
            return a <= b

    class Graph:
        sizevars = Sizes()

    if hasattr(inductor_config, "inductor_choices_class"):
        torch_config(inductor_config, inductor_choices_class=None)
    torch_config(inductor_config, fx_graph_cache=inductor_config.fx_graph_cache)
    before = V.choices
    try:
        persist_rows_up_to(8192)
        with V.set_graph_handler(Graph()):  # type: ignore[arg-type]
            chosen = V.choices
            assert type(chosen).__name__ == "WideRows" and isinstance(chosen, InductorChoices)
            assert chosen.should_use_persistent_reduction(Features(4096), False)
            assert chosen.should_use_persistent_reduction(Features(8192), False)
            assert not chosen.should_use_persistent_reduction(Features(16384), False)  # inductor's own: looped
            assert not InductorChoices.should_use_persistent_reduction(Features(4096), False)  # what it was
        key = getattr(inductor_config, "inductor_choices_class", None)
        assert (key is not None and key().uuid() == "tunelab-wide-rows-8192") or not inductor_config.fx_graph_cache
    finally:
        V.set_choices_handler(before)


def test_with_wide_rows_on_compiled_graphs_are_still_cached(
    monkeypatch: pytest.MonkeyPatch, torch_config: Callable[..., None], tmp_path: Path
) -> None:
    """The hook is part of inductor's cache key, so it must pickle: torch 2.11 pickles the hook's factory, and a
    class made inside a function can't be (on an H100 every `tunelab train` bypassed the graph cache).  The second
    compile of one function, after dynamo forgets it, is read from inductor's graph cache."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config
    from torch._inductor.virtualized import V

    from tunelab.backends.torch.fast import persist_rows_up_to

    if not hasattr(inductor_config, "inductor_choices_class"):
        pytest.skip("this inductor has no choices hook in its cache key")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    torch_config(inductor_config, inductor_choices_class=None, fx_graph_cache=True)
    before = V.choices

    def norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)

    try:
        persist_rows_up_to(8192)
        factory = pickle.loads(pickle.dumps(inductor_config.inductor_choices_class))
        assert factory().uuid() == "tunelab-wide-rows-8192"
        counters.clear()
        x = torch.randn(8, 64)
        for _ in range(2):
            torch._dynamo.reset()
            torch.testing.assert_close(torch.compile(norm)(x), norm(x))
        assert counters["inductor"]["fxgraph_cache_miss"] == 1
        assert counters["inductor"]["fxgraph_cache_hit"] == 1
    finally:
        V.set_choices_handler(before)
        torch._dynamo.reset()


@pytest.mark.gpu
def test_on_a_gpu_a_4096_wide_rms_norm_compiles_to_a_persistent_reduction() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from torch._inductor.utils import run_and_get_code
    from torch._inductor.virtualized import V

    from tunelab.backends.torch.fast import persist_rows_up_to

    def rms_norm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        z = x.float()
        return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5)).to(x.dtype) * w

    x = torch.randn(512, 4096, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, device="cuda", dtype=torch.bfloat16)
    before = V.choices
    try:
        persist_rows_up_to(8192)
        torch._dynamo.reset()
        out, codes = run_and_get_code(torch.compile(rms_norm), x, w)
    finally:
        V.set_choices_handler(before)
        torch._dynamo.reset()
    torch.testing.assert_close(out, rms_norm(x, w), rtol=2e-2, atol=2e-2)
    code = "\n".join(codes)
    assert "def triton_per" in code and "def triton_red" not in code  # the row read once, in one pass


def test_autotune_gemm_tunes_only_the_products_and_is_off_by_default(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch, torch_config: Callable[..., None]
) -> None:
    """bench/gpu_env.sh's switch autotune_gemm: compiling the layers turns on inductor's GEMM autotuning between
    cuBLAS and its Triton templates, and nothing else of max-autotune's search."""
    import torch._functorch.config as functorch_config
    from torch._inductor import config as inductor_config
    from transformers import AutoModelForCausalLM

    from tunelab.backends.torch import fast

    assert fast.AUTOTUNE_GEMM is False and fast.MODE is None
    names = ("max_autotune", "max_autotune_gemm", "max_autotune_gemm_backends", "max_autotune_pointwise")
    torch_config(inductor_config, **{name: getattr(inductor_config, name) for name in names})  # put back afterwards
    torch_config(functorch_config, activation_memory_budget=functorch_config.activation_memory_budget)
    monkeypatch.setattr(fast, "PERSISTENT_ROWS", None)
    monkeypatch.setattr(fast, "AUTOTUNE_GEMM", True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert fast.compile_decoder_layers(model, 0.8) == model.config.num_hidden_layers
    assert inductor_config.max_autotune_gemm is True
    assert inductor_config.max_autotune_gemm_backends == "ATEN,TRITON"
    assert not inductor_config.max_autotune and not inductor_config.max_autotune_pointwise


def test_host_switches_change_the_graph_wrappers_and_train_the_same(
    tiny_model_dir: Path, tiny_tokenizer: object, monkeypatch: pytest.MonkeyPatch, torch_config: Callable[..., None]
) -> None:
    """bench/gpu_env.sh's switches cpp_wrapper and runtime_asserts_off, on inductor's CPU code: with our checkpoints
    around the compiled layers, each gives the eager layers' losses and gradients, and changes what the layers
    run (every graph's wrapper in C++; no size checks in the Python one, where inductor's default has them)."""
    import torch._functorch.config as functorch_config
    from tests.backends.conftest import assert_same_loss_and_grads, load_backend, two_steps
    from torch._inductor import config as inductor_config
    from torch._inductor.codecache import PyCodeCache

    from tunelab.backends.torch import fast

    assert fast.CPP_WRAPPER is False and fast.RUNTIME_ASSERTS is True
    assert inductor_config.size_asserts and not inductor_config.cpp_wrapper  # what the switches turn around
    names = ("cpp_wrapper", "size_asserts", "alignment_asserts", "scalar_asserts")
    torch_config(inductor_config, **{name: getattr(inductor_config, name) for name in names})  # put back afterwards
    torch_config(functorch_config, activation_memory_budget=functorch_config.activation_memory_budget)
    monkeypatch.setattr(fast, "PERSISTENT_ROWS", None)  # inductor's CUDA heuristics: not what this test is about
    eager = two_steps(load_backend(tiny_model_dir, tiny_tokenizer), checkpoints=True)
    sources = {}
    for name, switch, value in (("cpp", "CPP_WRAPPER", True), ("bare", "RUNTIME_ASSERTS", False)):
        monkeypatch.setattr(fast, switch, value)
        torch._dynamo.reset()
        before = len(PyCodeCache.modules)  # a list: each graph's wrapper module is appended as it loads
        backend = load_backend(tiny_model_dir, tiny_tokenizer)
        assert fast.compile_decoder_layers(backend._causal_lm, 1.0) == 2
        assert_same_loss_and_grads(two_steps(backend, checkpoints=True), eager, "lora_A")
        sources[name] = [Path(module.__file__).read_text() for module in PyCodeCache.modules[before:]]
        monkeypatch.setattr(fast, switch, not value)
        inductor_config.cpp_wrapper = False  # inductor's defaults again for the next (torch_config: after the test)
        inductor_config.size_asserts = inductor_config.alignment_asserts = inductor_config.scalar_asserts = True
    torch._dynamo.reset()
    assert sources["cpp"] and all("CppWrapperCodeCache" in s for s in sources["cpp"])
    assert sources["bare"] and not any("assert_size_stride(" in s for s in sources["bare"])  # a call, not the import


def _packed_positions(rows: int, length: int, seed: int = 0) -> np.ndarray:
    """Rows of examples of random lengths, each row's positions restarting at 0 for every example."""
    rng = np.random.default_rng(seed)
    out = np.zeros((rows, length), dtype=np.int64)
    for row in out:
        at = 0
        while at < length:
            size = min(int(rng.integers(1, length // 2)), length - at)
            row[at : at + size] = np.arange(size)
            at += size
    return out


def test_cumulative_lengths_counted_on_the_host_are_those_the_device_would_count() -> None:
    """The training step counts the packed examples' starts on the host copy: on a GPU, counting them on the device
    (``nonzero``, and a blocking copy of the total) made each step's forward wait for the step before to finish."""
    from tunelab.backends.torch.attention import (
        CU_SEQ_LENS,
        TORCH_VARLEN,
        host_cu_seq_lens,
        model_inputs,
        varlen_kwargs,
    )

    positions = _packed_positions(3, 64)
    host = host_cu_seq_lens(positions)
    assert host.dtype == np.int32 and host[0] == 0 and host[-1] == positions.size
    counted = varlen_kwargs(torch.from_numpy(positions))["cu_seq_lens_q"]
    assert counted.dtype == torch.int32 and counted.tolist() == host.tolist()
    # Given the host's count, nothing is counted from the positions: on the meta device they can't be.
    meta = torch.from_numpy(positions).to("meta")
    given = torch.from_numpy(host)
    inputs = model_inputs({"input_ids": meta, "position_ids": meta, CU_SEQ_LENS: given}, TORCH_VARLEN)
    assert inputs["cu_seq_lens_q"] is given and inputs["max_length_q"] == 64
    with pytest.raises(NotImplementedError):
        model_inputs({"input_ids": meta, "position_ids": meta}, TORCH_VARLEN)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
def test_a_packed_step_on_cuda_never_waits_for_the_device(checkpointing: bool) -> None:
    """After its first steps (the first reads the gradient norm once), a packed compiled step queues its work
    without one synchronising call, with checkpointing too (offloaded to pinned CPU memory by default): with
    CUDA's sync debug mode set to error, any would raise."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
        num_attention_heads=8, num_key_value_heads=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).cuda()
    backend = TorchBackend()
    spec = ModelSpec("", "bfloat16", compile=True, fused_loss=True, packing=True, gradient_checkpointing=checkpointing)
    backend.attach(model, spec, MethodSpec("lora", rank=16, alpha=32.0), OptimSpec(), None)
    assert backend.checkpointing == ("offloaded" if checkpointing else "off")
    rng = np.random.default_rng(0)
    batches = []
    for seed in range(4):
        ids = rng.integers(0, 4096, size=(4, 1024))
        batches.append({"input_ids": ids, "labels": ids.copy(), "position_ids": _packed_positions(4, 1024, seed)})
    for batch in batches[:2]:  # compiles, and the first step's one read of the gradient norm
        backend.forward_backward(batch, 1.0 / 4096)
        backend.optimizer_step(1e-3)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:]:
            backend.forward_backward(batch, 1.0 / 4096)
            backend.optimizer_step(1e-3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
