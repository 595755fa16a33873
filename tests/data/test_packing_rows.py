"""Packing: rows are full, deterministic and complete; packed batches never let one example train another."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from tests.data.splits import PAD, make_split

from tunelab.data.batching import BatchPlan, MicroBatchStream, collate
from tunelab.data.packing import collate_packed, pack_rows, packed_eval_batches, row_lengths
from tunelab.vocab import IGNORE

CAPACITY = 256


def skewed_lengths(n: int, seed: int = 0) -> np.ndarray:
    """Mostly short examples with a long tail, like instruction data."""
    lengths = np.random.default_rng(seed).lognormal(mean=4.0, sigma=0.8, size=n).astype(np.int64)
    return np.clip(lengths, 4, CAPACITY)


def test_rows_hold_every_example_once_and_never_overflow() -> None:
    lengths = skewed_lengths(3000)
    rows = pack_rows(lengths, CAPACITY, seed=0, shuffle=True)
    assert sorted(int(i) for row in rows for i in row) == list(range(len(lengths)))
    assert row_lengths(lengths, rows).max() <= CAPACITY
    fill = lengths.sum() / (len(rows) * CAPACITY)
    assert fill > 0.95, fill  # first-fit-decreasing leaves little room unused


def test_packing_is_a_function_of_the_seed() -> None:
    lengths = skewed_lengths(500)
    same = [pack_rows(lengths, CAPACITY, seed=3, shuffle=True) for _ in range(2)]
    assert all(np.array_equal(a, b) for a, b in zip(*same, strict=True))
    other = pack_rows(lengths, CAPACITY, seed=4, shuffle=True)
    assert any(not np.array_equal(a, b) for a, b in zip(same[0], other, strict=False))


def test_packed_batch_restarts_positions_and_ignores_each_first_label() -> None:
    split = make_split([5, 3, 4, 2])
    batch = collate_packed(split, [np.array([0, 1]), np.array([2, 3]), np.array([1])], PAD)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["position_ids"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["position_ids"][2].tolist() == [0, 1, 2, 0, 1, 2, 3, 4]  # padding tail restarts too
    assert batch["segment_ids"][1].tolist() == [1, 1, 1, 1, 2, 2, 0, 0]
    assert batch["attention_mask"][2].tolist() == [1, 1, 1, 0, 0, 0, 0, 0]
    np.testing.assert_array_equal(batch["input_ids"][0], np.concatenate([split.input_ids[0], split.input_ids[1]]))
    labels = batch["labels"][0]
    assert labels[0] == IGNORE and labels[5] == IGNORE  # each example's first label
    np.testing.assert_array_equal(labels[1:5], split.labels[0][1:])
    np.testing.assert_array_equal(labels[6:8], split.labels[1][1:])
    assert (batch["labels"][2, 3:] == IGNORE).all() and (batch["input_ids"][2, 3:] == PAD).all()


def test_no_token_learns_to_predict_the_next_example() -> None:
    """With the shifted loss, position t predicts label t+1: never across an example boundary."""
    lengths = skewed_lengths(200, seed=1)
    split = make_split(lengths)
    for i in range(len(split)):  # even if every example's first token carried a label upstream
        split.labels[i][0] = split.input_ids[i][0]
    rows = pack_rows(lengths, CAPACITY, seed=0, shuffle=True)
    batch = collate_packed(split, rows[:8], PAD)
    segments, targets = batch["segment_ids"], batch["labels"][:, 1:]
    crossing = segments[:, 1:] != segments[:, :-1]
    assert crossing.any()
    assert (targets[crossing] == IGNORE).all()


def test_packed_batches_supervise_exactly_the_unpacked_tokens() -> None:
    split = make_split(skewed_lengths(300, seed=2))
    plan = BatchPlan(4, 0, True, True)
    packed = MicroBatchStream(split, plan, PAD, pack_to=CAPACITY)
    unpacked = MicroBatchStream(split, plan, PAD)

    def count(stream: MicroBatchStream) -> int:
        return sum(int((stream.get(c)["labels"][:, 1:] != IGNORE).sum()) for c in range(stream.batches_per_epoch))

    assert count(packed) == count(unpacked) == split.supervised_tokens
    assert packed.batches_per_epoch < unpacked.batches_per_epoch / 3
    ungrouped = MicroBatchStream(split, BatchPlan(4, 0, True, False), PAD)
    assert packed.token_efficiency > 0.95 > 0.8 > ungrouped.token_efficiency


def test_packed_stream_resumes_at_any_cursor_and_reorders_rows_each_epoch() -> None:
    split = make_split(skewed_lengths(300, seed=3))
    plan = BatchPlan(2, 7, True, True)
    stream = MicroBatchStream(split, plan, PAD, pack_to=CAPACITY)
    per_epoch = stream.batches_per_epoch
    cursors = [0, 3, per_epoch - 1, per_epoch, per_epoch + 2, 3 * per_epoch + 1]
    expected = {c: stream.get(c) for c in range(3 * per_epoch + 2)}
    for c in reversed(cursors):  # a fresh stream (a resumed run) jumps straight to the cursor
        batch = MicroBatchStream(split, plan, PAD, pack_to=CAPACITY).get(c)
        assert all(np.array_equal(batch[k], expected[c][k]) for k in batch)

    def rows(epoch: int) -> list[bytes]:
        batches = [expected[epoch * per_epoch + c] for c in range(per_epoch)]
        return [
            ids[mask == 1].tobytes()
            for b in batches
            for ids, mask in zip(b["input_ids"], b["attention_mask"], strict=True)
        ]

    assert rows(0) != rows(1) and sorted(rows(0)) == sorted(rows(1))  # the same rows, in another order


def test_packed_eval_batches_cover_every_example_once() -> None:
    split = make_split(skewed_lengths(120, seed=4))
    batches = packed_eval_batches(split, 3, CAPACITY, PAD)
    assert sum(int(row.max()) for b in batches for row in b["segment_ids"]) == len(split)  # examples per row
    assert sum(int(b["attention_mask"].sum()) for b in batches) == int(split.lengths.sum())
    assert sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in batches) == split.supervised_tokens


def test_unpacked_batches_are_unchanged() -> None:
    split = make_split([5, 3])
    stream = MicroBatchStream(split, BatchPlan(2, 0, False, False), PAD)
    assert set(stream.get(0)) == {"input_ids", "labels", "attention_mask"}
    np.testing.assert_array_equal(stream.get(0)["input_ids"], collate(split, np.array([0, 1]), PAD)["input_ids"])


@pytest.mark.skipif(importlib.util.find_spec("mlx") is None, reason="mlx not installed")
def test_mlx_rope_rotates_each_token_by_its_own_position() -> None:
    import mlx.core as mx
    import mlx.nn as nn

    from tunelab.backends.mlx.packing import PositionalRoPE, packed_mask

    rope = nn.RoPE(8, base=10000.0)
    x = mx.random.normal((1, 2, 7, 8), key=mx.random.key(0))  # (batch, heads, length, dims)
    positions = mx.array([[0, 1, 2, 0, 1, 2, 3]])
    out = PositionalRoPE(rope)(x, offset=positions)
    expected = mx.concatenate([rope(x[:, :, :3]), rope(x[:, :, 3:])], axis=2)  # each example from 0
    assert mx.allclose(out, expected, atol=1e-6).item()
    assert mx.allclose(PositionalRoPE(rope)(x, offset=5), rope(x, offset=5)).item()  # generation unchanged

    segments = mx.array([[1, 1, 1, 2, 2, 2, 0]])
    mask = packed_mask(segments, window=2, rank=4)
    assert mask.shape == (1, 1, 7, 7)
    allowed = {(q, k) for q in range(7) for k in range(7) if mask[0, 0, q, k].item()}
    assert allowed == {(0, 0), (1, 0), (1, 1), (2, 1), (2, 2), (3, 3), (4, 3), (4, 4), (5, 4), (5, 5), (6, 6)}
