"""The training loop.  It drives any :class:`Backend` and knows nothing of torch or mlx.

One optimizer step = ``grad_accum`` micro-batches.  The loss of a step is the
token-weighted mean over all supervised tokens of all its micro-batches (each
micro-batch's summed loss is scaled by 1/total tokens before backward), which
is what a single large batch would compute — the gradient-accumulation bug of
averaging per-batch means does not happen here.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunelab.backends.base import Backend, Batch
from tunelab.backends.preference import add_stats, loss_units, reduce_stats
from tunelab.data.batching import MicroBatchStream
from tunelab.data.prefetch import Prefetcher
from tunelab.distributed.sharding import DataParallel
from tunelab.errors import DivergedError
from tunelab.train.backoff import HINTS, OutOfMemoryError, accumulate_with_backoff
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
        total += part.loss_sum
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
        with Prefetcher(stream, opts.grad_accum) as batches:
            return _steps(backend, batches, valid, schedule, opts, state, callbacks, should_stop, parallel)
    finally:
        callbacks.flush()


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
    last_end = time.perf_counter()  # wall clock between step ends: the step plus the loop's own work
    while state.step < opts.total_steps:
        micro = batches.take(state.cursor)  # global micro-batches, collated while the previous step ran
        started = time.perf_counter()
        loss, lr, grad_norm, stats = _train_step(backend, micro, schedule, opts, state, callbacks, parallel)
        ended = time.perf_counter()
        wall, last_end = ended - last_end, ended
        tokens = int(sum(int(b["attention_mask"].sum()) for b in micro))
        state.step += 1
        state.cursor += opts.grad_accum
        state.tokens_seen += tokens
        state.elapsed_s += wall
        if state.step % opts.log_every == 0 or state.step == opts.total_steps:
            metrics = {
                "train_loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "epoch": batches.stream.epoch_of(state.cursor),
                **stats,  # the objective's diagnostics (preference: rewards/chosen, rewards/accuracy, …)
            }
            callbacks.on_metrics(state.step, {**metrics, **_pace(backend, micro, tokens, wall, ended - started)})
        finished = state.step == opts.total_steps
        if valid and (finished or (opts.eval_every and state.step % opts.eval_every == 0)):
            _validate(backend, valid, state, callbacks, parallel)
            if opts.scorer is not None:  # on a fixed sample of the validation data, beside val_loss
                callbacks.on_metrics(state.step, opts.scorer(backend))
        if opts.sampler is not None and opts.sample_every and (finished or state.step % opts.sample_every == 0):
            # One process generates (a rank alone can't under FSDP: the recipe turns sampling off there).
            callbacks.on_samples(state.step, opts.sampler(backend))
        stop = should_stop()
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


def _train_step(
    backend: Backend,
    micro: list[Batch],
    schedule: Schedule,
    opts: LoopOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    parallel: DataParallel,
) -> tuple[float, float, float, dict[str, float]]:
    """One optimizer step over ``micro``; returns its loss, learning rate, gradient norm and diagnostics.

    A non-finite loss stops the run before the optimizer applies it, and a
    non-finite gradient norm before the weights it produced can be checkpointed.
    """
    supervised = sum(loss_units(b) for b in micro)  # tokens, or pairs / KTO examples for preference objectives
    try:
        loss_sum, stats, state.micro_parts = accumulate_with_backoff(
            backend,
            micro,
            parallel,
            state.micro_parts,
            supervised,
            step=state.step,
            on_backoff=callbacks.on_backoff,
            hints=opts.memory_hints,
        )
    except OutOfMemoryError:
        _save_last_step(backend, state, opts, callbacks, parallel)
        raise
    if parallel.group.world > 1:
        loss_sum = parallel.group.all_sum([loss_sum])[0]
    loss = loss_sum / max(supervised, 1)
    check_finite("loss", loss, state.step + 1)
    lr = schedule(state.step)
    grad_norm = backend.optimizer_step(lr)
    check_finite("gradient norm", grad_norm, state.step + 1)
    return loss, lr, grad_norm, reduce_stats(_all_sum(parallel, stats))


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
