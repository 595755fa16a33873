"""GRPO end to end on torch: the shipped toy task is learned, and a stopped run resumes to the same weights."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

from tunelab import services
from tunelab.config.load import load_config

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "examples" / "grpo-sums.yaml"
HAS_MLX = importlib.util.find_spec("mlx") is not None and importlib.util.find_spec("mlx_lm") is not None
BACKENDS = ["torch", pytest.param("mlx", marks=pytest.mark.skipif(not HAS_MLX, reason="mlx is not installed"))]
# The learning test's steps. The cosine schedule spans them: at 600 (mean reward of the last 50 steps, exact-match
# part) torch ends at 0.86 / 0.83 and MLX at 0.90 / 0.88, as at 1,200 (0.86 / 0.83, 0.93 / 0.91) for half the time.
LEARN_STEPS = 600


@pytest.fixture(scope="module")
def sums_model(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: list[str]) -> Path:
    """A random-initialised 2-layer llama, a little wider than the suite's tiny one (hidden 64)."""
    from tunelab.tiny import make_tiny_checkpoint

    out = tmp_path_factory.mktemp("grpo_model") / "llama"
    return make_tiny_checkpoint(out, tiny_corpus, arch="llama", tokenizer="bpe", vocab_size=400, hidden_size=64,
                                num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)  # fmt: skip


def _example(model: Path, out: Path, backend: str = "torch", **train: object) -> dict:
    """The shipped example as-is (data, rewards, sampling), on the tiny model with its training knobs."""
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    raw["model"]["path"] = str(model)
    raw["data"]["train"] = str(ROOT / raw["data"]["train"])
    # A LoRA over a random model this small does not move its output layer: the whole model trains.
    raw["method"] = {"name": "full"}
    raw["train"].update({"lr": 1.5e-3, "save_every": 0, **train})
    raw.update(output_dir=str(out), tensorboard=False, backend=backend)
    return raw


def _rewards(output_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward" in r]


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sum_task_is_learned_from_its_rewards(
    backend: str, sums_model: Path, tmp_path: Path, cli: Callable[..., Any]
) -> None:
    # Through `tunelab train`, in a process of its own: what a user runs, and timed apart from the suite's
    # other tests (the MLX run took 4x longer inside a pytest process that had trained much with torch).
    config = tmp_path / "grpo.yaml"
    raw = _example(sums_model, tmp_path / "run", backend, steps=LEARN_STEPS)
    config.write_text(yaml.safe_dump(raw), encoding="utf-8")
    done = cli("train", config)
    assert done.returncode == 0, done.stderr[-3000:]
    result = tmp_path / "run" / "model"
    rows = _rewards(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, LEARN_STEPS + 1))
    first, last = np.mean([r["reward"] for r in rows[:10]]), np.mean([r["reward"] for r in rows[-50:]])
    assert first < 0.2 and last > 0.8, (first, last)
    assert np.mean([r["reward/exact_match"] for r in rows[-50:]]) > 0.75  # the sums themselves, not the format
    for key in ("train_loss", "reward_std", "reward/regex_match", "reward/exact_match_std", "kl", "clip_ratio",
                "completion_length"):  # fmt: skip
        assert key in rows[-1]
    assert rows[-1]["kl"] > 0  # beta 0.04 against the frozen copy of the base (method full)
    assert any(result.glob("*.safetensors"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stopped_run_resumes_to_the_same_weights_and_samples(backend: str, sums_model: Path, tmp_path: Path) -> None:
    whole = services.start_run(load_config(_example(sums_model, tmp_path / "whole", backend, steps=6)))
    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] == 3

    stopped = services.start_run(
        load_config(_example(sums_model, tmp_path / "parts", backend, steps=6)), should_stop=stop_after_three
    )
    assert stopped.status == "cancelled" and (tmp_path / "parts" / "checkpoints" / "step-3").is_dir()
    state = json.loads((tmp_path / "parts" / "checkpoints" / "step-3" / "trainer_state.json").read_text())
    assert state["sampler_rng"]["bit_generator"] == "PCG64"  # the sampling stream is part of the checkpoint
    resumed = services.resume_run(stopped.run_id)
    assert resumed.status == "completed" and whole.result_dir is not None and resumed.result_dir is not None
    files = sorted(whole.result_dir.glob("*.safetensors"))
    assert files
    for file in files:
        a, b = load_file(file), load_file(resumed.result_dir / file.name)
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    same = {r["step"]: r["reward"] for r in _rewards(whole.output_dir)}
    assert {r["step"]: r["reward"] for r in _rewards(resumed.output_dir) if r["step"] > 3} == {
        s: v for s, v in same.items() if s > 3
    }


@pytest.mark.parametrize("backend", BACKENDS)
def test_chat_prompts_train_with_the_other_built_in_rewards_and_validate(
    backend: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    records = [{"messages": [{"role": "user", "content": f"Give {n} as JSON"}], "n": n} for n in range(6)]
    for name, part in (("train", records[:4]), ("valid", records[4:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    rewards = [{"name": "json_valid"}, {"name": "length_penalty", "limit": 20, "weight": 0.5}]
    cfg = load_config({
        "model": {"path": str(tiny_model_dir)}, "data": {"train": str(tmp_path), "max_seq_len": 48},
        "objective": {"name": "grpo", "rewards": rewards, "num_generations": 3, "max_new_tokens": 6, "beta": 0},
        "train": {"steps": 2, "batch_size": 1, "grad_accum": 2, "eval_every": 1},
        "output_dir": str(tmp_path / "out"), "tensorboard": False, "backend": backend,
    })  # fmt: skip
    outcome = services.start_run(cfg)
    assert outcome.status == "completed" and outcome.result_dir is not None
    rows = [json.loads(line) for line in (outcome.output_dir / "metrics.jsonl").read_text().splitlines()]
    last = _rewards(outcome.output_dir)[-1]
    assert -0.5 <= last["reward/length_penalty"] * 0.5 <= 0 and 0 <= last["reward/json_valid"] <= 1
    assert "kl" not in last  # beta 0: no reference forward
    assert 1 <= last["completion_length"] <= 6
    assert last["epoch"] == 1.0  # 2 prompts a step (batch 1 x grad_accum 2) over 4 prompts: 2 steps, 1 epoch
    validations = [r for r in rows if "val_reward" in r]  # the 2 held-out prompts, answered greedily, each step
    assert [r["step"] for r in validations] == [1, 2]
    assert {"val_reward/json_valid", "val_reward/length_penalty", "val_completion_length"} <= set(validations[-1])


def test_a_killed_run_resumes_to_the_uninterrupted_adapter(sums_model: Path, tmp_path: Path) -> None:
    import signal

    from tests.integration.runs import adapter_diff, only_run_id, start_cli, wait_for

    def write(root: Path) -> Path:
        raw = _example(sums_model, root / "out", steps=48, save_every=4, lr=5e-3)
        raw["method"] = {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1}  # dropout: torch's RNG resumes too
        root.mkdir(parents=True, exist_ok=True)
        (root / "cfg.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
        return root / "cfg.yaml"

    ref = start_cli("train", write(tmp_path / "ref"), home=tmp_path / "ref" / "home")
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err
    home = tmp_path / "crash" / "home"
    proc = start_cli("train", write(tmp_path / "crash"), home=home)
    wait_for(tmp_path / "crash" / "out" / "checkpoints" / "step-8", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (tmp_path / "crash" / "out" / "adapter").exists(), "the run finished before it could be killed"
    resumed = start_cli("train", "--resume", only_run_id(home), home=home)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert adapter_diff(tmp_path / "ref" / "out" / "adapter", tmp_path / "crash" / "out" / "adapter") == 0.0
