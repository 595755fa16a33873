"""The memory estimator and automatic batch size: the behaviour users rely on."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from tunelab.config.load import load_config
from tunelab.errors import ConfigError, ModelError
from tunelab.memory.autobatch import choose_batch, divisors
from tunelab.memory.estimate import estimate
from tunelab.memory.plan import estimate_config
from tunelab.memory.shapes import read_shape
from tunelab.memory.workload import GiB, Workload

# Llama-3.1-8B's config.json, the numbers that matter.
LLAMA_8B = {
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
SHAPE = read_shape(LLAMA_8B)
GPU = Workload(backend="torch", device="cuda", dtype="bfloat16", rank=16, batch=2, seq_len=2048)


@pytest.mark.parametrize(
    ("arch", "extra"),
    [
        ("llama", {}),
        ("qwen2", {}),  # q/k/v biases
        ("qwen3", {}),  # per-head q/k norms
        ("gemma", {"tie_word_embeddings": True}),
        ("gemma2", {"tie_word_embeddings": True}),  # four norms per block
        ("phi3", {}),  # fused qkv_proj and gate_up_proj
    ],
)
def test_shape_counts_the_parameters_transformers_builds(arch: str, extra: dict, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tunelab.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / arch, arch=arch, vocab_size=96, hidden_size=32, num_heads=4, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert read_shape(folder).num_params == sum(p.numel() for p in model.parameters())


def test_llama_8b_weights_match_the_published_size() -> None:
    assert SHAPE.num_params == pytest.approx(8.03e9, rel=0.005)
    assert estimate(SHAPE, GPU).get("weights") == SHAPE.num_params * 2


@pytest.mark.parametrize("field", ["batch", "seq_len", "rank"])
def test_more_batch_tokens_or_rank_never_needs_less(field: str) -> None:
    values = (256, 512, 1024, 2048) if field == "seq_len" else (1, 2, 4, 8)
    totals = [estimate(SHAPE, replace(GPU, **{field: value})).total for value in values]
    assert totals == sorted(totals) and totals[0] < totals[-1]


def test_checkpointing_lowers_activations_and_the_peak() -> None:
    plain = estimate(SHAPE, GPU)
    checkpointed = estimate(SHAPE, replace(GPU, gradient_checkpointing=True))
    assert checkpointed.get("activations") < plain.get("activations") / 5
    assert checkpointed.total < plain.total


def test_quantization_lowers_the_weights() -> None:
    bf16 = estimate(SHAPE, GPU).get("weights")
    int8 = estimate(SHAPE, replace(GPU, method="qlora", bits=8)).get("weights")
    nf4 = estimate(SHAPE, replace(GPU, method="qlora", bits=4)).get("weights")
    nf4_plain = estimate(SHAPE, replace(GPU, method="qlora", bits=4, double_quant=False)).get("weights")
    assert nf4 < nf4_plain < int8 < bf16
    assert 5 * GiB < nf4 < 6 * GiB  # 4-bit blocks, 16-bit embeddings and head
    mlx = replace(GPU, backend="mlx", device="metal", bits=4)
    assert estimate(SHAPE, replace(mlx, group_size=32)).get("weights") > estimate(SHAPE, mlx).get("weights")


def test_breakdown_sums_to_the_total_and_names_what_is_outside_tensors() -> None:
    for work in (GPU, replace(GPU, method="full"), replace(GPU, backend="mlx", device="metal")):
        est = estimate(SHAPE, work)
        assert sum(line.bytes for line in est.lines) == est.total
        outside = est.get("runtime") + est.get("allocator")
        assert est.tensor_bytes == est.total - outside and est.get("runtime") > 0
    assert json.loads(json.dumps(estimate(SHAPE, GPU).to_dict()))["total_bytes"] == estimate(SHAPE, GPU).total


def test_full_fine_tuning_counts_weights_once_and_adamw_twice() -> None:
    full = estimate(SHAPE, replace(GPU, method="full"))
    assert full.get("trainable") == 0  # the trained weights are the weights
    assert full.get("optimizer") == 2 * full.get("weights")
    assert full.trainable_params == SHAPE.num_params


def test_lora_targets_decide_the_adapter_size() -> None:
    every = estimate(SHAPE, GPU).trainable_params
    qv = estimate(SHAPE, replace(GPU, targets=("q_proj", "v_proj"))).trainable_params
    assert qv == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    assert qv < every


def test_config_mistakes_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="q_proj, k_proj"):
        estimate(SHAPE, replace(GPU, targets=("query",)))
    with pytest.raises(ConfigError, match=r"method\.bits"):
        estimate(SHAPE, replace(GPU, method="qlora", bits=3))
    with pytest.raises(ModelError, match="mixture-of-experts"):
        read_shape({**LLAMA_8B, "model_type": "mixtral", "num_local_experts": 8})
    with pytest.raises(ModelError, match="lacks a size"):
        read_shape({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(ModelError, match=r"no config\.json"):
        read_shape(tmp_path)


def test_choose_batch_takes_the_largest_fitting_divisor_and_keeps_the_effective_batch() -> None:
    peak = lambda size: 10 + 7 * size  # noqa: E731 - a monotonic stand-in for the estimator
    chosen = choose_batch(peak, budget=100, effective=24)  # 90 usable: size 11 fits, 12 doesn't
    assert (chosen.batch_size, chosen.grad_accum) == (8, 3)  # 8 is the largest divisor of 24 under 11
    assert chosen.batch_size * chosen.grad_accum == 24
    assert divisors(12) == [12, 6, 4, 3, 2, 1]
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        choose_batch(peak, budget=10, effective=8)


def _config(model: Path, **train: object) -> dict:
    return {"model": {"path": str(model)}, "data": {"train": "unused.jsonl", "max_seq_len": 256}, "train": train}


def test_auto_batch_fits_the_budget_that_the_next_size_exceeds(tiny_model_dir: Path) -> None:
    cfg = load_config(_config(tiny_model_dir, batch_size="auto", effective_batch_size=64))
    fixed = [
        estimate_config(cfg.model_copy(update={"train": cfg.train.model_copy(update={"batch_size": b})}))
        for b in (8, 16)
    ]
    budget = (fixed[0].estimate.total + fixed[1].estimate.total) // 2 / 0.9  # type: ignore[union-attr]
    plan = estimate_config(cfg, device="cpu", budget_bytes=int(budget))
    assert (plan.batch_size, plan.grad_accum, plan.auto) == (8, 8, True)
    assert plan.fits is True


def test_effective_batch_defaults_to_four_times_grad_accum_and_checks_its_partners() -> None:
    base = {"model": {"path": "m"}, "data": {"train": "d"}}
    assert load_config(base, ["train.batch_size=auto", "train.grad_accum=3"]).train.effective_batch == 12
    assert load_config(base, ["train.batch_size=8", "train.grad_accum=2"]).train.effective_batch == 16
    for bad, message in (
        (["train.batch_size=0"], "whole number from 1 to 65536, or auto"),
        (["train.batch_size=8", "train.effective_batch_size=32"], "goes with batch_size: auto"),
        (["train.batch_size=auto", "train.effective_batch_size=32", "train.grad_accum=2"], "remove grad_accum"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_config(base, bad)


def test_train_estimate_uses_the_longest_example_and_a_resumed_auto_run_keeps_its_batch(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    import numpy as np

    from tunelab.data.tokenize import TokenizedSplit
    from tunelab.memory.plan import PLAN_FILE, data_extent, plan_run
    from tunelab.vocab import IGNORE

    ids = [np.arange(n) for n in (10, 40, 25)]
    labels = [np.where(np.arange(len(x)) < len(x) // 2, IGNORE, x) for x in ids]  # second half supervised
    split = TokenizedSplit(ids, labels)
    seq_len, supervised = data_extent(split, 1024, packed=False)
    assert seq_len == 40 and supervised == pytest.approx(20 / 39)
    assert data_extent(split, 32, packed=False)[0] == 32  # truncation caps it

    cfg = load_config(_config(tiny_model_dir, batch_size="auto", effective_batch_size=6))
    resolved, plan = plan_run(cfg, tiny_model_dir, "torch", split, tmp_path, resume=False)
    assert (resolved.train.batch_size, resolved.train.grad_accum) == (plan.batch_size, plan.grad_accum) == (6, 1)
    assert plan.estimate is not None and plan.estimate.workload.seq_len == 40
    saved = json.loads((tmp_path / PLAN_FILE).read_text())
    (tmp_path / PLAN_FILE).write_text(json.dumps({**saved, "batch_size": 2, "grad_accum": 3}))
    resumed, again = plan_run(cfg, tiny_model_dir, "torch", split, tmp_path, resume=True)
    assert (resumed.train.batch_size, resumed.train.grad_accum, again.auto) == (2, 3, True)
    assert "batch 2 × grad_accum 3 (auto)" in again.summary()


def test_a_measured_peak_far_from_the_estimate_is_said_and_a_close_one_is_not(tiny_model_dir: Path) -> None:
    plan = estimate_config(load_config(_config(tiny_model_dir, batch_size=4)), device="cpu")
    assert plan.estimate is not None
    total = plan.estimate.total
    assert plan.measured(int(total * 1.1)) is None and plan.measured(int(total * 0.9)) is None
    above = plan.measured(int(total * 1.3))
    assert above is not None and "30% above the estimate" in above
    below = plan.measured(int(total * 0.5))
    assert below is not None and "50% below" in below
    assert plan.measured(None) is None


def test_on_a_gpu_the_peak_is_compared_with_the_tensor_estimate(tiny_model_dir: Path) -> None:
    """torch.cuda.max_memory_allocated sees tensors only: the runtime and allocator lines are not in it."""
    plan = estimate_config(load_config(_config(tiny_model_dir, batch_size=4)), device="cuda")
    assert plan.estimate is not None
    tensors = plan.estimate.tensor_bytes
    assert plan.estimate.peak_bytes == tensors < plan.estimate.total
    assert plan.measured(int(tensors * 1.1)) is None
    assert "above the estimate" in str(plan.measured(int(tensors * 1.3)))


def test_host_embeddings_take_the_table_off_the_gpu_where_the_backend_can(tmp_path: Path) -> None:
    """auto follows offloaded checkpoints; a tied table (read whole by the head) stays."""
    untied, tied = tmp_path / "untied", tmp_path / "tied"
    for folder, tie in ((untied, False), (tied, True)):
        folder.mkdir()
        config = {"model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1024,
                  "num_hidden_layers": 2, "num_attention_heads": 8, "tie_word_embeddings": tie}  # fmt: skip
        (folder / "config.json").write_text(json.dumps(config))
    weights = {}
    for folder in (untied, tied):
        for gc in (False, True):
            cfg = load_config(_config(folder, batch_size=1, gradient_checkpointing=gc))
            plan = estimate_config(cfg, device="cuda")
            assert plan.estimate is not None
            weights[folder.name, gc] = plan.estimate.get("weights")
    table = 32000 * 512 * 2  # bf16 on CUDA
    assert weights["untied", False] - weights["untied", True] == table
    assert weights["tied", False] == weights["tied", True]


def test_a_4_bit_replay_counts_bitsandbytes_gate_and_up_outputs_unless_the_mlp_is_tiled() -> None:
    """Measured at a 1B QLoRA replay's peak: bitsandbytes' two MLP outputs beside the graph's own."""
    replayed = replace(GPU, compiled_layers=True, gradient_checkpointing=True)
    for tiled, added in ((False, 2 * 2 * 14336 * 4096), (True, 0)):
        lora, qlora = (replace(replayed, tiled_mlp=tiled, method=m, bits=b) for m, b in (("lora", None), ("qlora", 4)))
        assert estimate(SHAPE, qlora).get("activations") - estimate(SHAPE, lora).get("activations") == added
