"""Preference fine-tuning through `tunelab train CONFIG`, on torch and MLX (issue 17).

A learnable task: the chosen response lists the prompt's items as "- item" lines, the rejected one
reverses them comma-separated.  Every run goes through the CLI; its numbers are then checked against
an independent computation: the saved adapter loaded by transformers + PEFT, each response's
log-prob summed by hand, and the objective's textbook formula.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.conftest import run_cli

pytestmark = pytest.mark.slow

ITEMS = ["cat", "dog", "bird", "fish", "tree", "house", "river", "city", "mat", "sun", "rain", "road"]
BETA = {"dpo": 0.1, "ipo": 0.1, "kto": 0.1, "simpo": 2.0}
PAIRWISE = ("dpo", "ipo", "orpo", "simpo")


def _pair(rng: random.Random) -> dict[str, str]:
    xs = rng.sample(ITEMS, 3)
    return {
        "prompt": f"List: {', '.join(xs)}\n",
        "chosen": "\n".join(f"- {x}" for x in xs),
        "rejected": ", ".join(reversed(xs)),
    }


def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A preference folder (96 train, 24 held-out valid pairs) and the same prompts as KTO examples."""
    root = tmp_path_factory.mktemp("preference-data")
    rng = random.Random(0)
    pairs = [_pair(rng) for _ in range(120)]
    (root / "pairs").mkdir()
    _write(root / "pairs" / "train.jsonl", pairs[:96])
    _write(root / "pairs" / "valid.jsonl", pairs[96:])
    kto = [
        {"prompt": p["prompt"], "completion": p["chosen"] if i % 2 == 0 else p["rejected"], "label": i % 2 == 0}
        for i, p in enumerate(pairs)
    ]
    (root / "kto").mkdir()
    _write(root / "kto" / "train.jsonl", kto[:96])
    _write(root / "kto" / "valid.jsonl", kto[96:])
    return {"preference": root / "pairs", "kto": root / "kto"}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, data: dict[str, Path]) -> Path:
    from tunelab.tiny import make_tiny_checkpoint

    rows = [json.loads(line) for line in (data["preference"] / "train.jsonl").read_text().splitlines()]
    texts = [row[key] for row in rows for key in ("prompt", "chosen", "rejected")] * 3
    out = tmp_path_factory.mktemp("preference-model") / "model"
    sizes = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64}
    return make_tiny_checkpoint(out, texts, arch="llama", vocab_size=320, seed=0, **sizes)


@dataclass(frozen=True)
class Run:
    out: Path
    shown: dict[str, Any]
    metrics: list[dict[str, float]]

    def first(self, key: str) -> float:
        return next(row[key] for row in self.metrics if key in row)

    def last(self, key: str) -> float:
        return [row[key] for row in self.metrics if key in row][-1]


@pytest.fixture(scope="module")
def train(tmp_path_factory: pytest.TempPathFactory, model: Path, data: dict[str, Path]) -> Callable[..., Run]:
    """Train once per (objective, backend, extra settings) through the CLI; `runs show --json` of the run."""
    root = tmp_path_factory.mktemp("preference-runs")
    done: dict[tuple, Run] = {}

    def run(objective: str, backend: str, **extra: Any) -> Run:
        key = (objective, backend, *sorted(extra.items()))
        if key in done:
            return done[key]
        name = "-".join(str(part) for part in key)
        config = {
            "model": {"path": str(model), "dtype": "float32"},
            "data": {"train": str(data["kto" if objective == "kto" else "preference"]), "max_seq_len": 128},
            "method": {"name": extra.pop("method", "lora"), "rank": 4, "alpha": 8, "dropout": 0.0},
            "objective": {"name": objective, **extra},
            "train": {"steps": 20, "batch_size": 4, "lr": 1e-2, "eval_every": 10, "seed": 0, "warmup": 2},
            "backend": backend,
            "device": "cpu",
            "output_dir": str(root / name / "out"),
            "tensorboard": False,
        }
        if config["method"]["name"] == "full":
            config["train"]["lr"] = 1e-3
        (root / name).mkdir()
        (root / name / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
        trained = run_cli("train", root / name / "cfg.yaml", home=root / "home")
        assert trained.returncode == 0, trained.stderr
        run_id = trained.stdout.split()[1]
        shown = run_cli("runs", "show", run_id, "--json", home=root / "home")
        assert shown.returncode == 0, shown.stderr
        lines = (root / name / "out" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        done[key] = Run(root / name / "out", json.loads(shown.stdout), [json.loads(line) for line in lines])
        return done[key]

    return run


# --------------------------------------------------------------------------- the textbook, by hand


def _response_logps(model: Any, tokenizer: Any, prompt: str, response: str) -> tuple[float, int]:
    """log π(response | prompt) summed over its tokens (and EOS), tokenized as the completion convention says."""
    import torch

    head = tokenizer(prompt)["input_ids"]
    tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([head + tail])
    with torch.no_grad():
        logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
    picked = logps.gather(1, ids[0, 1:, None])[:, 0]
    return float(picked[-len(tail) :].sum()), len(tail)


def _textbook_loss(objective: str, pc: float, pr: float, rc: float, rr: float, nc: int, nr: int) -> tuple[float, bool]:
    """(loss, whether the chosen wins) of one pair: Rafailov, Azar, Hong and Meng et al.'s formulas."""
    logsig = lambda x: -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))  # noqa: E731
    if objective == "dpo":
        margin = BETA["dpo"] * ((pc - rc) - (pr - rr))
        return -logsig(margin), margin > 0
    if objective == "ipo":
        h = (pc - rc) - (pr - rr)
        return (h - 1 / (2 * BETA["ipo"])) ** 2, h > 0
    mc, mr = pc / nc, pr / nr
    if objective == "simpo":
        return -logsig(BETA["simpo"] * (mc - mr) - 0.5), mc > mr
    odds = lambda m: m - math.log1p(-math.exp(m))  # noqa: E731
    return -mc - 0.1 * logsig(odds(mc) - odds(mr)), mc > mr


def recompute(run: Run, base_dir: Path, valid: Path, objective: str) -> tuple[float, float]:
    """The mean validation loss and the held-out accuracy, from the saved adapter by transformers + PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = run.out / "adapter"
    tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    policy = PeftModel.from_pretrained(base, str(adapter)).eval()
    losses, wins = [], []
    for line in valid.read_text(encoding="utf-8").splitlines():
        pair = json.loads(line)
        (pc, nc), (pr, nr) = (
            _response_logps(policy, tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")
        )
        with policy.disable_adapter():
            (rc, _), (rr, _) = (
                _response_logps(policy, tokenizer, pair["prompt"], pair[k]) for k in ("chosen", "rejected")
            )
        loss, won = _textbook_loss(objective, pc, pr, rc, rr, nc, nr)
        losses.append(loss)
        wins.append(won)
    return sum(losses) / len(losses), sum(wins) / len(wins)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_dpo_with_a_zero_initialised_lora_starts_at_ln2(backend: str, train: Callable[..., Run]) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    run = train("dpo", backend)
    assert abs(run.first("train_loss") - math.log(2)) < 1e-6, run.first("train_loss")
    assert run.first("rewards/margin") == 0.0


@pytest.mark.parametrize(("objective", "backend"), [(o, "torch") for o in PAIRWISE] + [("dpo", "mlx")])
def test_the_reported_validation_loss_is_the_textbook_one_from_the_saved_adapter(
    objective: str, backend: str, train: Callable[..., Run], model: Path, data: dict[str, Path]
) -> None:
    if backend == "mlx":
        pytest.importorskip("mlx_lm")
    run = train(objective, backend)
    reported = run.shown["metrics"]["val_loss"]
    measured, accuracy = recompute(run, model, data["preference"] / "valid.jsonl", objective)
    assert abs(measured - reported) <= 1e-3 * max(1.0, abs(reported)), (measured, reported)
    # Learned: the model prefers the chosen response on held-out pairs, as it reports.
    assert accuracy >= 0.9 and run.shown["metrics"]["val_reward_accuracy"] == pytest.approx(accuracy)


@pytest.mark.parametrize("objective", ["dpo", "ipo", "orpo", "simpo", "kto"])
def test_torch_and_mlx_train_the_same(objective: str, train: Callable[..., Run]) -> None:
    pytest.importorskip("mlx_lm")
    on_torch, on_mlx = train(objective, "torch"), train(objective, "mlx")
    assert abs(on_torch.first("train_loss") - on_mlx.first("train_loss")) <= 1e-4
    final = on_torch.last("val_loss"), on_mlx.last("val_loss")
    assert abs(final[0] - final[1]) <= 0.01 * abs(final[0]), final


def test_runs_show_names_the_objective_and_its_metrics(train: Callable[..., Run]) -> None:
    run = train("dpo", "torch")
    objective = {"name": "dpo", "beta": 0.1, "gamma": None, "alpha": None, "precompute_ref": False}
    grpo_knobs = ("rewards", "num_generations", "max_new_tokens", "temperature", "epsilon")  # unset: None
    assert run.shown["config"]["objective"] == {**objective, **dict.fromkeys(grpo_knobs)}
    metrics = run.shown["metrics"]
    for key in ("train_loss", "rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        assert metrics[key] is not None, key
    assert metrics["rewards/margin"] == pytest.approx(metrics["rewards/chosen"] - metrics["rewards/rejected"])
    assert metrics["val_reward_accuracy"] >= 0.9 and "val_ppl" not in metrics
    assert run.shown["dataset"]["format"] == "preference"
    kto = train("kto", "torch").shown
    assert kto["config"]["objective"]["name"] == "kto" and kto["dataset"]["format"] == "kto"
    assert kto["metrics"]["val_reward_accuracy"] >= 0.9 and kto["metrics"]["val_kl"] is not None


def test_full_finetuning_against_a_frozen_copy_or_precomputed_reference_agrees(train: Callable[..., Run]) -> None:
    frozen = train("dpo", "torch", method="full")
    precomputed = train("dpo", "torch", method="full", precompute_ref=True)
    assert abs(frozen.first("train_loss") - math.log(2)) < 1e-6
    assert abs(frozen.last("val_loss") - precomputed.last("val_loss")) <= 1e-4, (
        frozen.last("val_loss"),
        precomputed.last("val_loss"),
    )
    assert frozen.last("val_reward_accuracy") >= 0.9


def test_dpo_killed_then_resumed_ends_at_the_uninterrupted_adapter(
    model: Path, data: dict[str, Path], tmp_path: Path
) -> None:
    import signal

    from tests.integration.runs import adapter_diff, only_run_id, start_cli, wait_for

    def write(root: Path) -> Path:
        config = {
            "model": {"path": str(model), "dtype": "float32"},
            "data": {"train": str(data["preference"]), "max_seq_len": 128},
            "method": {"name": "lora", "rank": 4, "alpha": 8, "dropout": 0.1},
            "objective": {"name": "dpo"},
            "train": {"steps": 24, "batch_size": 4, "lr": 1e-2, "save_every": 4, "seed": 1},
            "backend": "torch",
            "output_dir": str(root / "out"),
            "tensorboard": False,
        }
        root.mkdir(parents=True, exist_ok=True)
        (root / "cfg.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
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
    assert adapter_diff(tmp_path / "ref" / "out" / "adapter", tmp_path / "crash" / "out" / "adapter") <= 1e-5
