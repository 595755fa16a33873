"""Preference losses: each objective's formula on both backends against the textbook one, and the batch layout.

The end-to-end checks (ln 2 at step 1, the validation loss recomputed with transformers + PEFT,
torch/MLX parity) are in tests/integration/test_preference_training.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from tunelab.backends.base import ObjectiveSpec
from tunelab.backends.preference import host_arrays, layout, loss_units, reduce_stats
from tunelab.vocab import IGNORE, ROLE_CHOSEN, ROLE_DESIRABLE, ROLE_KL, ROLE_REJECTED, ROLE_UNDESIRABLE

SPEC = {
    "dpo": ObjectiveSpec("dpo", beta=0.3),
    "ipo": ObjectiveSpec("ipo", beta=0.2),
    "orpo": ObjectiveSpec("orpo", alpha=0.4),
    "simpo": ObjectiveSpec("simpo", beta=2.5, gamma=0.7),
    "kto": ObjectiveSpec("kto", beta=0.5),
}


def _logsigmoid(x: np.ndarray) -> np.ndarray:
    return -np.logaddexp(0.0, -x)


def textbook(name: str, policy: np.ndarray, ref: np.ndarray, lengths: np.ndarray, good: np.ndarray) -> np.ndarray:
    """The papers' per-unit losses, written out in float64."""
    s = SPEC[name]
    if name == "dpo":
        return -_logsigmoid(s.beta * ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1])))
    if name == "ipo":
        return ((policy[:, 0] - ref[:, 0]) - (policy[:, 1] - ref[:, 1]) - 1 / (2 * s.beta)) ** 2
    mean = policy / lengths
    if name == "simpo":
        return -_logsigmoid(s.beta * mean[:, 0] - s.beta * mean[:, 1] - s.gamma)
    if name == "orpo":
        odds = mean - np.log1p(-np.exp(mean))
        return -mean[:, 0] - s.alpha * _logsigmoid(odds[:, 0] - odds[:, 1])
    z = max(0.0, float(np.mean(policy[:, 1] - ref[:, 1])))
    r = policy[:, 0] - ref[:, 0]
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    return np.where(good > 0, 1 - sig(s.beta * (r - z)), 1 - sig(s.beta * (z - r)))


def _scores(seed: int) -> tuple[np.ndarray, ...]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 30, size=(6, 2)).astype(np.float64)
    policy = -lengths * rng.uniform(0.5, 3.0, size=(6, 2))
    ref = policy + rng.normal(0, 2.0, size=(6, 2))
    good = (rng.uniform(size=6) > 0.5).astype(np.float64)
    return policy, ref, lengths, good


@pytest.mark.parametrize("name", list(SPEC))
def test_torch_losses_are_the_textbook_formulas(name: str) -> None:
    import torch

    from tunelab.backends.torch.objectives import LOSSES
    from tunelab.backends.torch.preference import Scores

    policy, ref, lengths, good = _scores(1)
    t = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    losses, stats = LOSSES[name](Scores(t(policy), t(ref), t(lengths), t(good)), SPEC[name])
    np.testing.assert_allclose(losses.numpy(), textbook(name, policy, ref, lengths, good), rtol=1e-5, atol=1e-5)
    assert "rewards/chosen" in stats and "rewards/accuracy" in stats


@pytest.mark.parametrize("name", list(SPEC))
def test_mlx_losses_are_the_textbook_formulas(name: str) -> None:
    pytest.importorskip("mlx.core")
    import mlx.core as mx

    from tunelab.backends.mlx.objectives import LOSSES
    from tunelab.backends.mlx.preference import Scores

    policy, ref, lengths, good = _scores(2)
    m = lambda a: mx.array(a.astype(np.float32))  # noqa: E731
    losses, _ = LOSSES[name](Scores(m(policy), m(ref), m(lengths), m(good)), SPEC[name])
    np.testing.assert_allclose(np.array(losses), textbook(name, policy, ref, lengths, good), rtol=1e-5, atol=1e-5)


def test_dpo_diagnostics_are_the_implicit_rewards() -> None:
    import torch

    from tunelab.backends.torch.preference import Scores, dpo, floats

    policy = torch.tensor([[-3.0, -5.0], [-4.0, -2.0]])
    ref = torch.tensor([[-4.0, -4.0], [-4.0, -4.0]])
    _, stats = dpo(Scores(policy, ref, torch.ones(2, 2)), ObjectiveSpec("dpo", beta=0.5))
    means = reduce_stats(floats(stats))
    assert means["rewards/chosen"] == pytest.approx((0.5 + 0.0) / 2)  # β(π − ref) of the chosen
    assert means["rewards/rejected"] == pytest.approx((-0.5 + 1.0) / 2)
    assert means["rewards/margin"] == pytest.approx(0.0)
    assert means["rewards/accuracy"] == 0.5
    # At the reference (a zero-initialised adapter) every pair's loss is ln 2.
    losses, _ = dpo(Scores(ref, ref, torch.ones(2, 2)), ObjectiveSpec("dpo"))
    assert torch.allclose(losses, torch.full((2,), math.log(2.0)))


def _batch(rows: list[list[int]], roles: list[int], prompt: int = 2) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    labels = np.full((len(rows), width), IGNORE, np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        labels[i, prompt : len(row)] = row[prompt:]
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "roles": mask * np.array(roles)[:, None]}


def test_the_layout_finds_each_sequence_packed_or_not() -> None:
    rows = [[5, 6, 7, 8], [5, 6, 9], [4, 3, 2, 1, 7], [4, 3, 8]]
    plain = _batch(rows, [ROLE_CHOSEN, ROLE_REJECTED] * 2)
    found = layout(plain)
    assert found.roles.tolist() == [1, 2, 1, 2] and found.lengths.tolist() == [2, 1, 3, 1] and found.units == 2
    assert loss_units(plain) == 2 and loss_units({k: v for k, v in plain.items() if k != "roles"}) == 7
    # The same two pairs packed one pair per row: the same sequences, in the same order.
    packed_ids = [rows[0] + rows[1], rows[2] + rows[3]]
    packed = _batch(packed_ids, [0, 0])
    packed["labels"][:] = IGNORE
    packed["segment_ids"] = np.zeros_like(packed["input_ids"])
    packed["roles"] = np.zeros_like(packed["input_ids"])
    for r, (first, second) in enumerate([(rows[0], rows[1]), (rows[2], rows[3])]):
        a, b = len(first), len(second)
        packed["segment_ids"][r, :a], packed["segment_ids"][r, a : a + b] = 1, 2
        packed["roles"][r, :a], packed["roles"][r, a : a + b] = ROLE_CHOSEN, ROLE_REJECTED
        packed["labels"][r, 2:a], packed["labels"][r, a + 2 : a + b] = first[2:], second[2:]
    again = layout(packed)
    assert again.roles.tolist() == found.roles.tolist() and again.lengths.tolist() == found.lengths.tolist()
    assert loss_units(packed) == 2


def test_kto_layout_marks_desirable_examples_and_sums_precomputed_reference() -> None:
    batch = _batch(
        [[1, 2, 3, 4], [1, 2, 5], [6, 7, 8], [6, 7, 4]], [ROLE_DESIRABLE, ROLE_KL, ROLE_UNDESIRABLE, ROLE_KL]
    )
    batch["ref_logps"] = np.arange(12, dtype=np.float32).reshape(4, 3).repeat(2, axis=1)[:, :4] * -0.5
    arrays = host_arrays(batch)
    assert arrays["desirable"].tolist() == [1.0, 0.0]
    expected = [batch["ref_logps"][r, 2 : 2 + n].sum() for r, n in enumerate([2, 1, 1, 1])]
    np.testing.assert_allclose(arrays["ref_seq"], expected)


def test_a_batch_not_in_units_is_refused() -> None:
    from tunelab.errors import StateError

    with pytest.raises(StateError):
        layout(_batch([[1, 2, 3], [1, 2, 4]], [ROLE_REJECTED, ROLE_CHOSEN]))
    with pytest.raises(StateError):
        layout(_batch([[1, 2, 3]], [ROLE_UNDESIRABLE]))
