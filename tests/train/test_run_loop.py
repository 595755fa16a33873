"""run_loop on its own: a real torch backend over the tiny model, fed micro-batches directly.

Everything else exercises the loop end to end (recipe, registry, CLI).  Here it
gets hand-made token rows whose micro-batches hold very different numbers of
supervised tokens, so the step loss tells a token-weighted mean (what one large
batch computes) from a mean of per-micro-batch means, and a stop request shows
what the loop itself does: checkpoint, message, ``interrupted``, and a resume
that finishes the remaining steps.
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from tunelab.backends.base import MethodSpec, ModelSpec, OptimSpec  # noqa: E402
from tunelab.backends.torch.backend import TorchBackend  # noqa: E402
from tunelab.data.batching import BatchPlan, MicroBatchStream  # noqa: E402
from tunelab.data.tokenize import TokenizedSplit  # noqa: E402
from tunelab.train.callbacks import BaseCallback  # noqa: E402
from tunelab.train.checkpoint import TrainerState  # noqa: E402
from tunelab.train.loop import LoopOptions, run_loop  # noqa: E402
from tunelab.vocab import IGNORE  # noqa: E402

LENGTH = 24
SUPERVISED = (20, 1, 12, 3)  # tokens with a label in rows 0..3; micro-batches are rows (0, 1) and (2, 3)


class Recorder(BaseCallback):
    """What the loop reports, by step."""

    def __init__(self) -> None:
        self.metrics: dict[int, dict[str, float]] = {}
        self.checkpoints: list[tuple[int, Path]] = []
        self.messages: list[str] = []

    def on_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.metrics.setdefault(step, {}).update(metrics)

    def on_checkpoint(self, step: int, path: Path) -> None:
        self.checkpoints.append((step, path))

    def on_message(self, text: str) -> None:
        self.messages.append(text)


def _split() -> TokenizedSplit:
    rng = np.random.default_rng(0)
    ids, labels = [], []
    for supervised in SUPERVISED:
        row = rng.integers(3, 200, size=LENGTH).astype(np.int32)
        label = np.full(LENGTH, IGNORE, dtype=np.int32)
        label[LENGTH - supervised :] = row[LENGTH - supervised :]  # the last tokens carry the loss
        ids.append(row)
        labels.append(label)
    return TokenizedSplit(ids, labels)


def _stream(split: TokenizedSplit) -> MicroBatchStream:
    return MicroBatchStream(split, BatchPlan(batch_size=2, seed=0, shuffle=False, group_by_length=False), pad_id=0)


def _backend(model: Path) -> TorchBackend:
    backend = TorchBackend()
    backend.load(ModelSpec(str(model), dtype="float32", device="cpu"), MethodSpec(), OptimSpec(), None)
    return backend


def _options(tmp_path: Path, **overrides: int) -> LoopOptions:
    numbers = {"total_steps": 1, "grad_accum": 2, "eval_every": 0, "save_every": 0, "log_every": 1}
    numbers.update(overrides)
    return LoopOptions(**numbers, keep_checkpoints=3, checkpoint_dir=tmp_path / "checkpoints")


def test_a_step_loss_is_the_token_weighted_mean_over_its_micro_batches(tiny_model_dir: Path, tmp_path: Path) -> None:
    backend, stream = _backend(tiny_model_dir), _stream(_split())
    parts = [backend.eval_loss(stream.get(i)) for i in range(2)]  # lr 0 below: the weights never change
    assert [p.tokens for p in parts] == [20 + 1, 12 + 3]  # so the two means differ
    weighted = sum(p.loss_sum for p in parts) / sum(p.tokens for p in parts)
    mean_of_means = sum(p.loss_sum / p.tokens for p in parts) / 2

    seen = Recorder()
    result = run_loop(backend, stream, None, lambda _step: 0.0, _options(tmp_path), TrainerState(), seen)

    assert result.status == "completed" and (result.state.step, result.state.cursor) == (1, 2)
    loss = seen.metrics[1]["train_loss"]
    assert loss == pytest.approx(weighted, rel=1e-5)
    assert abs(loss - mean_of_means) > 100 * abs(loss - weighted) + 1e-4, "averaged per micro-batch, not per token"
    assert result.state.tokens_seen == 4 * LENGTH  # every row's real tokens, supervised or not


def test_a_stop_request_checkpoints_and_a_resume_finishes_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    split = _split()
    valid = [_stream(split).get(0)]  # rows 0 and 1 as a validation batch
    opts = _options(tmp_path, total_steps=4, eval_every=2)
    asked = iter([False, True])  # stop is requested after the second step

    first, seen = _backend(tiny_model_dir), Recorder()
    stopped = run_loop(first, _stream(split), valid, lambda _s: 1e-3, opts, TrainerState(), seen, lambda: next(asked))

    assert stopped.status == "interrupted" and stopped.state.step == 2 and stopped.state.cursor == 4
    assert [(step, path.name) for step, path in seen.checkpoints] == [(2, "step-2")]
    assert any("stopped at step 2" in m for m in seen.messages)
    assert set(seen.metrics) == {1, 2} and "val_loss" in seen.metrics[2] and "val_loss" not in seen.metrics[1]
    assert stopped.state.last_val_loss == seen.metrics[2]["val_loss"]

    resumed, more = _backend(tiny_model_dir), Recorder()
    resumed.load_checkpoint(seen.checkpoints[0][1])
    state = TrainerState.from_dict(vars(stopped.state).copy())
    done = run_loop(resumed, _stream(split), valid, lambda _s: 1e-3, opts, state, more)

    assert done.status == "completed" and done.state.step == 4 and done.state.cursor == 8
    assert set(more.metrics) == {3, 4} and "val_loss" in more.metrics[4]
    assert more.checkpoints == []  # the last step writes no checkpoint: the recipe saves the result


class _Read:
    """A value the backend returned; notes in ``events`` when the loop reads it (``float()``)."""

    def __init__(self, value: Any, events: list[str], mark: str) -> None:
        self.value, self.events, self.mark = value, events, mark

    def __float__(self) -> float:
        self.events.append(self.mark)
        return float(self.value)


class _Traced:
    """The real torch backend, noting the order of the loop's calls and of its reads of what they returned."""

    def __init__(self, backend: TorchBackend) -> None:
        self.backend, self.events = backend, list[str]()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.backend, name)

    def forward_backward(self, batch: Any, loss_scale: float) -> Any:
        part = self.backend.forward_backward(batch, loss_scale)
        self.events.append("F")
        return dataclasses.replace(part, loss_sum=_Read(part.loss_sum, self.events, "L"))

    def optimizer_step(self, lr: float) -> Any:
        self.events.append("O")
        return _Read(self.backend.optimizer_step(lr), self.events, "N")


@pytest.mark.parametrize(
    ("save_every", "order"),
    [
        (0, "FO FLNO FLNO FLNOLN"),  # each step read once the next one's backward is queued; the last at once
        (2, "FO FLNOLN FO FLNOLN"),  # a step that saves is read at once, so is the last
    ],
)
def test_each_step_is_read_back_once_the_next_ones_backward_is_queued(
    tiny_model_dir: Path, tmp_path: Path, save_every: int, order: str
) -> None:
    """Reading a step's loss waits for the device, so the loop reads it a step late (before the next optimizer
    step, while the weights are still that step's), except where it validates, saves or ends."""
    stream = _stream(_split())
    plain = _backend(tiny_model_dir)
    expected = [plain.eval_loss(stream.get(i)) for i in range(2)]  # lr 0 below: the weights never change
    traced, seen = _Traced(_backend(tiny_model_dir)), Recorder()
    opts = _options(tmp_path, total_steps=4, grad_accum=1, save_every=save_every)

    result = run_loop(cast(Any, traced), stream, None, lambda _s: 0.0, opts, TrainerState(), seen)

    assert result.status == "completed" and result.state.step == 4
    assert "".join(traced.events) == order.replace(" ", "")
    assert [step for step, _ in seen.checkpoints] == ([2] if save_every else [])
    for step in range(1, 5):  # every step logged, with its own batch's loss (rows 0-1, 2-3, 0-1, 2-3)
        part = expected[(step - 1) % 2]
        assert seen.metrics[step]["train_loss"] == pytest.approx(float(part.loss_sum) / part.tokens, rel=1e-5)
        assert seen.metrics[step]["grad_norm"] > 0


def test_the_loader_thread_gathers_host_held_embedding_rows_ahead_of_each_step(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """train.offload_embeddings: each micro-batch's rows are gathered on the loader's helper thread while the step
    before runs, and the step only copies them in; the losses are those of gathering in the step."""
    from tunelab.backends.torch.host_embedding import move_embeddings_to_host

    losses, gathered_on = {}, {}
    for ahead in (False, True):
        backend = _backend(tiny_model_dir)
        host = move_embeddings_to_host(backend._causal_lm, backend.device)
        backend._host_embed = host
        threads: list[str] = []
        inner = host._host_rows
        host._host_rows = lambda ids, f=inner, seen=threads: seen.append(threading.current_thread().name) or f(ids)  # type: ignore[method-assign]
        if not ahead:
            backend.prepare_batch = lambda batch, waiting: None  # type: ignore[method-assign]
        seen = Recorder()
        opts = _options(tmp_path / str(ahead), total_steps=3)
        result = run_loop(backend, _stream(_split()), None, lambda _s: 1e-3, opts, TrainerState(), seen)
        assert result.status == "completed"
        losses[ahead] = [seen.metrics[step]["train_loss"] for step in (1, 2, 3)]
        gathered_on[ahead] = threads
    assert len(gathered_on[True]) >= 6  # 3 steps of 2 micro-batches (the loader may have begun a 4th step's)
    assert all(name.startswith("tunelab-batches") for name in gathered_on[True]), gathered_on[True]
    assert gathered_on[False] == ["MainThread"] * 6
    assert losses[True] == losses[False]
