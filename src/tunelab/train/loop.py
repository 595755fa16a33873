"""The training loop.  It drives any :class:`Backend` and knows nothing of torch or mlx.

One optimizer step = ``grad_accum`` micro-batches.  The loss of a step is the
token-weighted mean over all supervised tokens of all its micro-batches (each
micro-batch's summed loss is scaled by 1/total tokens before backward), which
is what a single large batch would compute — the gradient-accumulation bug of
averaging per-batch means does not happen here.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import SupportsFloat

import numpy as np

from tunelab.backends.base import Backend, Batch
from tunelab.backends.preference import add_stats, loss_units, reduce_stats
from tunelab.data.batching import MicroBatchStream
from tunelab.data.prefetch import Prefetcher
from tunelab.distributed.sharding import DataParallel
from tunelab.errors import DivergedError
from tunelab.train.backoff import HINTS, OutOfMemoryError, Stats, accumulate_with_backoff, split_rows
from tunelab.train.callbacks import BaseCallback
from tunelab.train.checkpoint import TrainerState, save_checkpoint
from tunelab.train.schedules import Schedule


@dataclass(frozen=True)
class LoopOptions:
    """Plain numbers the loop needs (built from ``train:`` by the service layer)."""

    total_steps: int
    grad_accum: int
    eval_every: int
    save_every: int
    log_every: int
    keep_checkpoints: int
    checkpoint_dir: Path
    sample_every: int = 0
    sampler: Callable[[Backend], list[dict[str, str]]] | None = None  # answers fixed prompts (train.sample_every)
    scorer: Callable[[Backend], dict[str, float]] | None = None  # train.eval_metrics, at each validation
    memory_hints: Sequence[str] = HINTS  # what an out-of-memory stop tells the user to change


@dataclass(frozen=True)
class LoopResult:
    state: TrainerState
    status: str  # completed | interrupted


def evaluate(backend: Backend, batches: Sequence[Batch], parallel: DataParallel = DataParallel()) -> float:
    """Token-weighted mean cross-entropy over every supervised token of the validation set.

    (For a preference objective: the mean loss over the validation pairs or KTO examples.)
    With several processes each evaluates its share of the batches and the sums are added up.
    """
    return evaluate_with_stats(backend, batches, parallel)[0]


def evaluate_with_stats(
    backend: Backend, batches: Sequence[Batch], parallel: DataParallel = DataParallel()
) -> tuple[float, dict[str, float]]:
    """:func:`evaluate`, and the means of the objective's diagnostics (e.g. ``rewards/accuracy``)."""
    total, tokens, stats = 0.0, 0.0, dict[str, tuple[float, float]]()
    for batch in parallel.share(batches):
        part = backend.eval_loss(batch)
        total += float(part.loss_sum)
        tokens += part.tokens
        add_stats(stats, part.stats)
    total, tokens = parallel.group.all_sum([total, tokens])
    return total / max(tokens, 1), reduce_stats(_all_sum(parallel, stats))


def _all_sum(parallel: DataParallel, stats: dict[str, tuple[float, float]]) -> dict[str, tuple[float, float]]:
    if parallel.group.world == 1 or not stats:
        return stats
    flat = parallel.group.all_sum([x for pair in stats.values() for x in pair])
    return {name: (flat[2 * i], flat[2 * i + 1]) for i, name in enumerate(stats)}


def run_loop(
    backend: Backend,
    stream: MicroBatchStream,
    valid: Sequence[Batch] | None,
    schedule: Schedule,
    opts: LoopOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    should_stop: Callable[[], bool] = lambda: False,
    parallel: DataParallel = DataParallel(),
) -> LoopResult:
    """Train from ``state`` to ``opts.total_steps``; save and return early when ``should_stop()``.

    With several processes (``parallel``) every rank runs this loop in step: each
    takes its rows of the same global micro-batches, the loss is scaled by the
    global supervised-token count, and only rank 0 writes checkpoints.

    Callbacks may buffer what they are told; they are flushed before every
    checkpoint (so what a checkpoint covers is recorded when it exists) and when
    the loop ends, however it ends.
    """
    callbacks.on_start(step=state.step, total_steps=opts.total_steps)
    try:
        # After an out-of-memory back-off a step runs each micro-batch in pieces (split_rows): prepared as such
        def prepare(batch: Batch, waiting: int) -> None:
            pieces = split_rows(batch, state.micro_parts)
            for piece in pieces:
                backend.prepare_batch(piece, waiting * len(pieces))

        with Prefetcher(stream, opts.grad_accum, prepare) as batches:
            return _steps(backend, batches, valid, schedule, opts, state, callbacks, should_stop, parallel)
    finally:
        callbacks.flush()


@dataclass
class _Queued:
    """A step whose work is queued on the device and whose loss and gradient norm are not read back yet."""

    micro: list[Batch]
    losses: list[SupportsFloat]  # each micro-batch's summed loss: numbers, or device scalars until read
    stats: Stats
    supervised: int
    lr: float
    grad_norm: SupportsFloat


def _steps(
    backend: Backend,
    batches: Prefetcher,
    valid: Sequence[Batch] | None,
    schedule: Schedule,
    opts: LoopOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    should_stop: Callable[[], bool],
    parallel: DataParallel,
) -> LoopResult:
    """The steps, each read back one step late where nothing needs it at once.

    Reading a step's loss and gradient norm waits for the device to finish it.
    Read right away, the device then idles while the host steps the optimizer
    and prepares the next step (the first copies, launching its first kernels):
    ~20 ms between one step's last kernel and the next one's first in a profile
    of 8B LoRA 2x2048 on an H100, whose step takes ~375 ms.  So a step's numbers are read once the next
    step's forward and backward are queued, and before its optimizer step,
    while the weights are still the ones that step produced.  A step that
    validates, samples, saves, stops or ends the run is read at once instead,
    so none of those see a later step's gradients in memory.  Checks and
    metrics are the same either way, only later; nothing is checkpointed before
    its numbers were read and found finite.
    """
    clock = _Clock()
    queued: _Queued | None = None
    while state.step < opts.total_steps:
        # With a step in flight, the state is still the one before it: this step's rows start after its rows.
        with clock.own():  # collated ahead on the helper thread; waiting for it is the loop's own time
            micro = batches.take(state.cursor + (opts.grad_accum if queued is not None else 0))
        losses, stats, supervised = _queue(backend, micro, batches, opts, state, callbacks, parallel, queued, clock)
        if queued is not None:
            _record(backend, queued, batches, opts, state, callbacks, parallel, clock)
        lr = schedule(state.step)
        # Queued behind the backward, not waited for.
        queued = _Queued(micro, losses, stats, supervised, lr, backend.optimizer_step(lr))
        finished = state.step + 1 == opts.total_steps
        stop = should_stop()
        due = _due(state.step + 1, opts, valid is not None)
        if not (finished or stop or due):
            continue  # read after the next step's forward and backward are queued
        _record(backend, queued, batches, opts, state, callbacks, parallel, clock)
        queued = None
        with clock.own():
            if valid and (finished or (opts.eval_every and state.step % opts.eval_every == 0)):
                _validate(backend, valid, state, callbacks, parallel)
                if opts.scorer is not None:  # on a fixed sample of the validation data, beside val_loss
                    callbacks.on_metrics(state.step, opts.scorer(backend))
            if opts.sampler is not None and opts.sample_every and (finished or state.step % opts.sample_every == 0):
                # One process generates (a rank alone can't under FSDP: the recipe turns sampling off there).
                callbacks.on_samples(state.step, opts.sampler(backend))
            saving = (opts.save_every and state.step % opts.save_every == 0) or stop
            # The weights are the same on every rank, except under FSDP, where every rank saves its shards.
            if saving and not finished and (parallel.group.rank == 0 or getattr(backend, "collective_saves", False)):
                callbacks.flush()  # the metrics up to this step are recorded before the checkpoint exists
                path = save_checkpoint(
                    opts.checkpoint_dir, backend, state, keep=opts.keep_checkpoints, group=parallel.group
                )
                callbacks.on_checkpoint(state.step, path)
        if stop and not finished:
            callbacks.on_message(f"stopped at step {state.step}; resume with --resume")
            return LoopResult(state, "interrupted")
    return LoopResult(state, "completed")


def _due(step: int, opts: LoopOptions, validating: bool) -> bool:
    """Whether step ``step`` (1-based) validates, samples or saves: then it is read at once."""
    every = [opts.save_every, opts.sample_every if opts.sampler is not None else 0]
    every.append(opts.eval_every if validating else 0)
    return any(n and step % n == 0 for n in every)


class _Clock:
    """Step ends, and the time the loop spends on its own work (logging, validation, saving) in between."""

    def __init__(self) -> None:
        self.last_end = time.perf_counter()
        self.own_s = 0.0

    @contextlib.contextmanager
    def own(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.own_s += time.perf_counter() - started

    def lap(self) -> tuple[float, float]:
        """Wall time since the last step ended and the loop's own share of it; starts the next lap."""
        now = time.perf_counter()
        wall, own = now - self.last_end, self.own_s
        self.last_end, self.own_s = now, 0.0
        return wall, own


def _queue(
    backend: Backend,
    micro: list[Batch],
    batches: Prefetcher,
    opts: LoopOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    parallel: DataParallel,
    queued: _Queued | None,
    clock: _Clock,
) -> tuple[list[SupportsFloat], Stats, int]:
    """Forward and backward of one step's micro-batches, queued; backs off on out-of-memory.

    Returns each piece's loss (unread), the objective's diagnostics and the step's loss units.
    """
    supervised = sum(loss_units(b) for b in micro)  # tokens, or pairs / KTO examples for preference objectives
    try:
        losses, stats, state.micro_parts = accumulate_with_backoff(
            backend,
            micro,
            parallel,
            state.micro_parts,
            supervised,
            step=state.step + (queued is not None),
            on_backoff=callbacks.on_backoff,
            hints=opts.memory_hints,
        )
    except OutOfMemoryError:
        if queued is not None:  # the step before is read and checked first: it is the one saved
            _record(backend, queued, batches, opts, state, callbacks, parallel, clock)
        _save_last_step(backend, state, opts, callbacks, parallel)
        raise
    return losses, stats, supervised


def _record(
    backend: Backend,
    step: _Queued,
    batches: Prefetcher,
    opts: LoopOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    parallel: DataParallel,
    clock: _Clock,
) -> None:
    """Read a queued step's loss and gradient norm, stop if either is not finite, count it and log it.

    A non-finite loss or gradient norm stops the run before the weights that step produced can be
    checkpointed (they may already hold its update in memory; the last checkpoint holds only finite ones).
    """
    loss_sum = sum(float(x) for x in step.losses)  # waits for the device to finish this step
    if parallel.group.world > 1:
        loss_sum = parallel.group.all_sum([loss_sum])[0]
    loss = loss_sum / max(step.supervised, 1)
    check_finite("loss", loss, state.step + 1)
    grad_norm = float(step.grad_norm)
    check_finite("gradient norm", grad_norm, state.step + 1)
    wall, own = clock.lap()
    tokens = int(sum(int(b["attention_mask"].sum()) for b in step.micro))
    state.step += 1
    state.cursor += opts.grad_accum
    state.tokens_seen += tokens
    state.elapsed_s += wall
    if state.step % opts.log_every == 0 or state.step == opts.total_steps:
        with clock.own():
            metrics = {
                "train_loss": loss,
                "lr": step.lr,
                "grad_norm": grad_norm,
                "epoch": batches.stream.epoch_of(state.cursor),
                **reduce_stats(_all_sum(parallel, step.stats)),  # the objective's diagnostics (preference: …)
            }
            callbacks.on_metrics(state.step, {**metrics, **_pace(backend, step.micro, tokens, wall, wall - own)})


def _pace(backend: Backend, micro: list[Batch], tokens: int, wall: float, step: float) -> dict[str, float]:
    """Throughput between step ends (what the user gets) and of the step alone, padding share and memory."""
    metrics = {
        "tokens_per_sec": tokens / max(wall, 1e-9),
        "step_tokens_per_sec": tokens / max(step, 1e-9),
        "token_efficiency": tokens / max(sum(b["input_ids"].size for b in micro), 1),  # 1 - padding share
    }
    memory = backend.peak_memory_bytes()
    if memory is not None:
        metrics["peak_memory_gb"] = memory / 2**30
    return metrics


def check_finite(what: str, value: float, step: int) -> None:
    """Stop a diverged run with the step and what to change, instead of training on NaN weights."""
    if math.isfinite(value):
        return
    raise DivergedError(
        f"training diverged at step {step}: the {what} is {value} (not finite); the run stops here and keeps "
        "its last checkpoint, which holds only finite weights",
        hint="lower train.lr or method.alpha (or enable clipping with train.max_grad_norm), and check the data "
        "for broken examples; then start again, or resume from the last checkpoint with `tunelab train --resume`",
    )


def _save_last_step(
    backend: Backend, state: TrainerState, opts: LoopOptions, callbacks: BaseCallback, parallel: DataParallel
) -> None:
    """Checkpoint the last completed step before the run stops on an out-of-memory error it can't back off from."""
    if state.step > 0 and parallel.group.world == 1:
        path = save_checkpoint(opts.checkpoint_dir, backend, state, keep=opts.keep_checkpoints)
        callbacks.on_checkpoint(state.step, path)


def _validate(
    backend: Backend, valid: Sequence[Batch], state: TrainerState, callbacks: BaseCallback, parallel: DataParallel
) -> None:
    val_loss, stats = evaluate_with_stats(backend, valid, parallel)
    state.last_val_loss = val_loss
    if state.best_val_loss is None or val_loss < state.best_val_loss:
        state.best_val_loss = val_loss
    if not stats:  # a token cross-entropy: its perplexity
        callbacks.on_metrics(state.step, {"val_loss": val_loss, "val_ppl": float(np.exp(min(val_loss, 50.0)))})
        return
    # A preference objective's loss is per pair (no perplexity); rewards/accuracy -> val_reward_accuracy.
    named = {"val_" + name.replace("rewards/", "reward_"): value for name, value in stats.items()}
    callbacks.on_metrics(state.step, {"val_loss": val_loss, **named})
