"""Learning-rate schedules and deterministic, resumable batching (pure functions, no model needed)."""

from __future__ import annotations

import numpy as np
import pytest
from tests.data.splits import PAD, make_split

from tunelab.data.batching import BatchPlan, MicroBatchStream, collate, eval_batches
from tunelab.train.schedules import make_schedule, warmup_steps
from tunelab.vocab import IGNORE


def random_lengths(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(4, 300, size=n)


def flat(batches: list[np.ndarray]) -> list[int]:
    return sorted(int(i) for b in batches for i in b)


def padding(lengths: np.ndarray, batches: list[np.ndarray]) -> int:
    return int(sum(lengths[b].max() * len(b) - lengths[b].sum() for b in batches))


# --------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("warmup", "total", "expected"),
    [(0, 100, 0), (0.1, 100, 10), (0.25, 10, 2), (5, 100, 5), (1, 100, 1), (30.0, 100, 30)],
)
def test_warmup_fraction_or_steps(warmup: float, total: int, expected: int) -> None:
    assert warmup_steps(warmup, total) == expected


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_warmup_rises_linearly_to_the_peak(name: str) -> None:
    schedule = make_schedule(name, lr=1.0, total_steps=100, warmup=10)
    assert [schedule(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert schedule(10) == pytest.approx(1.0)


def test_constant_stays_at_the_peak() -> None:
    schedule = make_schedule("constant", lr=3e-4, total_steps=50, warmup=0)
    assert {schedule(s) for s in range(60)} == {3e-4}


def test_linear_decays_to_zero() -> None:
    schedule = make_schedule("linear", lr=2.0, total_steps=110, warmup=10)
    values = [schedule(s) for s in range(10, 111)]
    assert values[0] == pytest.approx(2.0)
    assert schedule(60) == pytest.approx(1.0)  # halfway through the decay
    assert schedule(110) == pytest.approx(0.0, abs=1e-12)
    assert np.allclose(np.diff(values), -0.02)  # a straight line
    assert schedule(500) == pytest.approx(0.0, abs=1e-12)  # never negative past the end


def test_cosine_decays_to_zero() -> None:
    schedule = make_schedule("cosine", lr=1.0, total_steps=100, warmup=0)
    values = np.array([schedule(s) for s in range(101)])
    assert values[0] == pytest.approx(1.0)
    assert schedule(50) == pytest.approx(0.5)
    assert schedule(25) == pytest.approx(0.5 * (1 + np.cos(np.pi / 4)))
    assert values[-1] == pytest.approx(0.0, abs=1e-12)
    assert (np.diff(values) <= 1e-15).all()  # never rises again
    assert 0 < values[-2] < 1e-3  # the last step that runs is close to 0


def test_schedule_is_a_pure_function_of_the_step() -> None:
    schedule = make_schedule("cosine", lr=1e-3, total_steps=40, warmup=4)
    forward = [schedule(s) for s in range(40)]
    assert [schedule(s) for s in reversed(range(40))] == forward[::-1]
    again = make_schedule("cosine", lr=1e-3, total_steps=40, warmup=4)
    assert [again(s) for s in range(40)] == forward


# --------------------------------------------------------------------------- BatchPlan


@pytest.mark.parametrize("group_by_length", [False, True])
def test_order_is_a_function_of_seed_and_epoch(group_by_length: bool) -> None:
    lengths = random_lengths(300)
    plan = BatchPlan(batch_size=4, seed=7, shuffle=True, group_by_length=group_by_length)
    first = plan.epoch_batches(lengths, 0)
    same = BatchPlan(batch_size=4, seed=7, shuffle=True, group_by_length=group_by_length).epoch_batches(lengths, 0)
    assert [b.tolist() for b in first] == [b.tolist() for b in same]
    other_epoch = plan.epoch_batches(lengths, 1)
    other_seed = BatchPlan(4, 8, True, group_by_length).epoch_batches(lengths, 0)
    assert [b.tolist() for b in other_epoch] != [b.tolist() for b in first]
    assert [b.tolist() for b in other_seed] != [b.tolist() for b in first]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("group_by_length", [False, True])
@pytest.mark.parametrize(("n", "batch_size"), [(1, 4), (10, 3), (257, 4), (600, 8)])
def test_every_example_exactly_once_per_epoch(shuffle: bool, group_by_length: bool, n: int, batch_size: int) -> None:
    lengths = random_lengths(n)
    plan = BatchPlan(batch_size=batch_size, seed=3, shuffle=shuffle, group_by_length=group_by_length)
    for epoch in range(3):
        batches = plan.epoch_batches(lengths, epoch)
        assert flat(batches) == list(range(n))
        assert len(batches) == -(-n // batch_size)
        assert all(1 <= len(b) <= batch_size for b in batches)
        assert sum(len(b) < batch_size for b in batches) <= 1


def test_no_shuffle_no_grouping_keeps_file_order() -> None:
    batches = BatchPlan(3, 0, shuffle=False, group_by_length=False).epoch_batches(random_lengths(8), 5)
    assert [b.tolist() for b in batches] == [[0, 1, 2], [3, 4, 5], [6, 7]]


def test_group_by_length_reduces_padding() -> None:
    lengths = random_lengths(1024)
    random_plan = BatchPlan(batch_size=8, seed=0, shuffle=True, group_by_length=False)
    grouped_plan = BatchPlan(batch_size=8, seed=0, shuffle=True, group_by_length=True)
    for epoch in range(2):
        random_pad = padding(lengths, random_plan.epoch_batches(lengths, epoch))
        grouped_pad = padding(lengths, grouped_plan.epoch_batches(lengths, epoch))
        assert grouped_pad < random_pad / 2
    # Grouped batches still come in a shuffled order, not longest-first.
    maxima = [int(lengths[b].max()) for b in grouped_plan.epoch_batches(lengths, 0)]
    assert maxima != sorted(maxima, reverse=True)


# --------------------------------------------------------------------------- MicroBatchStream


def test_stream_get_is_a_pure_function_of_the_cursor() -> None:
    split = make_split(random_lengths(23))
    plan = BatchPlan(batch_size=4, seed=11, shuffle=True, group_by_length=True)
    stream = MicroBatchStream(split, plan, pad_id=PAD)
    assert stream.batches_per_epoch == 6
    cursors = list(range(20))
    sequential = [stream.get(c) for c in cursors]
    # A fresh stream (a resumed run) that jumps around returns the same batches.
    resumed = MicroBatchStream(split, plan, pad_id=PAD)
    for c in [13, 2, 19, 0, 7, 13, 6, 5]:
        expected, got = sequential[c], resumed.get(c)
        assert set(got) == {"input_ids", "labels", "attention_mask"}
        for key in got:
            np.testing.assert_array_equal(got[key], expected[key])
    assert stream.epoch_of(9) == pytest.approx(1.5)


def test_stream_epochs_cover_every_example() -> None:
    split = make_split(random_lengths(10))
    stream = MicroBatchStream(split, BatchPlan(4, 0, True, False), pad_id=PAD)
    firsts = {tuple(ids.tolist()) for ids in split.input_ids}
    for epoch in range(2):
        seen = []
        for c in range(epoch * 3, epoch * 3 + 3):
            batch = stream.get(c)
            for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
                seen.append(tuple(row[mask.astype(bool)].tolist()))
        assert sorted(seen) == sorted(firsts)


# --------------------------------------------------------------------------- collate / eval


def test_collate_pads_right_with_no_loss_and_no_attention() -> None:
    split = make_split([5, 2, 3])
    pad_id = 77
    batch = collate(split, np.array([1, 0, 2]), pad_id)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == labels.shape == mask.shape == (3, 5)
    for row, example in enumerate([1, 0, 2]):
        n = len(split.input_ids[example])
        np.testing.assert_array_equal(ids[row, :n], split.input_ids[example])
        np.testing.assert_array_equal(labels[row, :n], split.labels[example])
        assert (ids[row, n:] == pad_id).all()
        assert (labels[row, n:] == IGNORE).all()
        assert mask[row].tolist() == [1] * n + [0] * (5 - n)
    assert ids.dtype == labels.dtype == mask.dtype == np.int64


@pytest.mark.parametrize("batch_size", [1, 3, 4, 50])
def test_eval_batches_cover_every_example_once(batch_size: int) -> None:
    lengths = random_lengths(17)
    split = make_split(lengths)
    batches = eval_batches(split, batch_size, pad_id=PAD)
    assert len(batches) == -(-17 // batch_size)
    rows = []
    for batch in batches:
        assert len(batch["input_ids"]) <= batch_size
        for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
            rows.append(tuple(row[mask.astype(bool)].tolist()))
    assert sorted(rows) == sorted(tuple(ids.tolist()) for ids in split.input_ids)
    # Length-sorted, so batches carry little padding.
    widths = [b["input_ids"].shape[1] for b in batches]
    assert widths == sorted(widths, reverse=True)
