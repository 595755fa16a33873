"""The GRPO loop: sample, reward, normalise within groups, step; generation and training alternate.

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` prompts, each prompt sampled
``num_generations`` times (a group) by the backend's own generation.  Every completion is scored by the
reward functions (Σ weight × reward) and its advantage is its reward's distance from its group's mean in
units of the group's standard deviation (Shao et al., 2024, DeepSeekMath); a group whose completions all
score the same teaches nothing and has advantage 0.  The loss is the backend's clipped policy loss
(+ β·KL to the reference), summed over the completion tokens of the step and divided by their number,
so long and short completions weigh per token, as SFT's loss does (no bias for short wrong answers).

Exact resume: the prompt order is a function of (seed, cursor), the sampling draws come from one numpy
random stream whose state is saved in every checkpoint (``TrainerState.sampler_rng``), and the backend's
checkpoint holds the weights, the optimizer and its own RNG.  Knows nothing of torch or mlx.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.backends.base import Backend, Batch
from tunelab.backends.preference import add_stats, reduce_stats
from tunelab.data.grpo import PromptSet, prompt_order
from tunelab.train.backoff import OutOfMemoryError
from tunelab.train.callbacks import BaseCallback
from tunelab.train.checkpoint import TrainerState, save_checkpoint
from tunelab.train.grpo_eval import validation_rewards
from tunelab.train.loop import LoopResult, check_finite
from tunelab.train.rewards import Reward, score
from tunelab.train.schedules import Schedule
from tunelab.vocab import IGNORE


@dataclass(frozen=True)
class GrpoOptions:
    """Plain numbers the loop needs (from ``train:`` and ``objective:``), and how ids become text."""

    total_steps: int
    grad_accum: int
    prompts_per_micro: int
    num_generations: int
    max_new_tokens: int
    temperature: float
    seed: int
    shuffle: bool
    save_every: int
    eval_every: int
    log_every: int
    keep_checkpoints: int
    checkpoint_dir: Path
    stop_ids: tuple[int, ...]
    pad_id: int
    decode: Callable[[list[int]], str]


@dataclass
class Group:
    """One micro-batch's samples: prompt and completion ids per row, old log-probs, advantages, rewards."""

    prompts: list[list[int]]
    completions: list[list[int]]
    logps: list[list[float]]
    advantages: np.ndarray
    rewards: np.ndarray  # (rows, reward functions), unweighted


def new_stream(seed: int) -> np.random.Generator:
    """The sampling stream of a fresh run (a resumed run restores the saved state instead)."""
    return np.random.Generator(np.random.PCG64([seed, 0x6752504F]))  # "grpo": apart from other uses of seed


def run_grpo(
    backend: Backend,
    prompts: PromptSet,
    rewards: Sequence[Reward],
    schedule: Schedule,
    opts: GrpoOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    should_stop: Callable[[], bool] = lambda: False,
    valid: PromptSet | None = None,
) -> LoopResult:
    """Train from ``state`` to ``opts.total_steps``; checkpoint and return early when ``should_stop()``.

    With ``valid`` prompts, every ``eval_every`` steps and at the end each is answered greedily and scored.
    """
    rng = new_stream(opts.seed)
    if state.sampler_rng is not None:
        rng.bit_generator.state = state.sampler_rng
    callbacks.on_start(step=state.step, total_steps=opts.total_steps)
    try:
        return _steps(backend, prompts, rewards, schedule, opts, state, callbacks, should_stop, rng, valid)
    finally:
        callbacks.flush()


def _steps(
    backend: Backend,
    prompts: PromptSet,
    rewards: Sequence[Reward],
    schedule: Schedule,
    opts: GrpoOptions,
    state: TrainerState,
    callbacks: BaseCallback,
    should_stop: Callable[[], bool],
    rng: np.random.Generator,
    valid: PromptSet | None,
) -> LoopResult:
    while state.step < opts.total_steps:
        started = time.perf_counter()
        try:
            groups, loss_sum, stats, sampled = _sample_and_learn(backend, prompts, rewards, opts, state, rng)
        except Exception as exc:
            if not backend.is_out_of_memory(exc):
                raise
            raise _out_of_memory(backend, exc, opts, state, callbacks) from exc
        tokens = sum(len(c) for g in groups for c in g.completions)
        loss = loss_sum / tokens
        check_finite("loss", loss, state.step + 1)
        lr = schedule(state.step)
        grad_norm = float(backend.optimizer_step(lr))
        check_finite("gradient norm", grad_norm, state.step + 1)
        ended = time.perf_counter()
        state.step += 1
        state.cursor += opts.grad_accum * opts.prompts_per_micro
        state.tokens_seen += sum(len(p) + len(c) for g in groups for p, c in zip(g.prompts, g.completions, strict=True))
        state.elapsed_s += ended - started
        state.sampler_rng = dict(rng.bit_generator.state)
        if state.step % opts.log_every == 0 or state.step == opts.total_steps:
            metrics = {"train_loss": loss, "lr": lr, "grad_norm": grad_norm, "epoch": state.cursor / len(prompts),
                       **reduce_stats(stats), **reward_metrics(groups, rewards),
                       "sample_s": sampled - started, "train_s": ended - sampled,
                       "tokens_per_sec": tokens / max(ended - started, 1e-9)}  # fmt: skip
            callbacks.on_metrics(state.step, metrics)
        finished = state.step == opts.total_steps
        if valid is not None and (finished or (opts.eval_every and state.step % opts.eval_every == 0)):
            rows = opts.prompts_per_micro * opts.num_generations  # as many rows as a training micro-batch
            scores = validation_rewards(backend, valid, rewards, rows=rows, max_new_tokens=opts.max_new_tokens,
                                        stop_ids=opts.stop_ids, decode=opts.decode)  # fmt: skip
            callbacks.on_metrics(state.step, scores)
        stop = should_stop()
        if ((opts.save_every and state.step % opts.save_every == 0) or stop) and not finished:
            callbacks.flush()  # the metrics up to this step are recorded before the checkpoint exists
            path = save_checkpoint(opts.checkpoint_dir, backend, state, keep=opts.keep_checkpoints)
            callbacks.on_checkpoint(state.step, path)
        if stop and not finished:
            callbacks.on_message(f"stopped at step {state.step}; resume with --resume")
            return LoopResult(state, "interrupted")
    return LoopResult(state, "completed")


def _sample_and_learn(
    backend: Backend,
    prompts: PromptSet,
    rewards: Sequence[Reward],
    opts: GrpoOptions,
    state: TrainerState,
    rng: np.random.Generator,
) -> tuple[list[Group], float, dict[str, tuple[float, float]], float]:
    """Sample the step's groups, then accumulate their gradients (scaled by the step's completion tokens)."""
    groups = [_sample(backend, prompts, rewards, opts, state.cursor + m * opts.prompts_per_micro, rng)
              for m in range(opts.grad_accum)]  # fmt: skip
    sampled = time.perf_counter()
    tokens = sum(len(c) for g in groups for c in g.completions)
    loss_sum, stats = 0.0, dict[str, tuple[float, float]]()
    for group in groups:
        part = backend.forward_backward(build_batch(group, opts.pad_id), 1.0 / tokens)
        loss_sum += float(part.loss_sum)
        add_stats(stats, part.stats)
    return groups, loss_sum, stats, sampled


def _out_of_memory(
    backend: Backend, exc: BaseException, opts: GrpoOptions, state: TrainerState, callbacks: BaseCallback
) -> OutOfMemoryError:
    """The run stops with what to lower; the last completed step (its sampling stream included) is checkpointed."""
    backend.release_memory()
    if state.step > 0:
        callbacks.flush()
        callbacks.on_checkpoint(state.step, save_checkpoint(opts.checkpoint_dir, backend, state,
                                                            keep=opts.keep_checkpoints))  # fmt: skip
    rows = opts.prompts_per_micro * opts.num_generations
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return OutOfMemoryError(
        f"out of memory at step {state.step + 1} sampling or training {rows} rows of up to {opts.max_new_tokens} "
        f"new tokens ({reason})" + ("; the last completed step is checkpointed" if state.step else ""),
        hint="lower train.batch_size (raise train.grad_accum to keep the step's prompts), objective.num_generations "
        "or objective.max_new_tokens, then resume with `tunelab train --resume RUN_ID`",
    )


def _sample(
    backend: Backend,
    prompts: PromptSet,
    rewards: Sequence[Reward],
    opts: GrpoOptions,
    start: int,
    rng: np.random.Generator,
) -> Group:
    """Sample a group per prompt of the micro-batch at ``start`` and score it."""
    chosen = prompt_order(len(prompts), opts.seed, opts.shuffle, start, opts.prompts_per_micro)
    rows = [i for i in chosen for _ in range(opts.num_generations)]
    uniforms = rng.random((len(rows), opts.max_new_tokens))  # drawn whatever the completions: a fixed stream
    ids = [prompts.ids[i] for i in rows]
    completions, logps = backend.sample_completions(  # type: ignore[attr-defined]
        ids, uniforms=uniforms, temperature=opts.temperature, stop_ids=opts.stop_ids
    )
    stops = set(opts.stop_ids)
    texts = [opts.decode([t for t in c if t not in stops]) for c in completions]
    values = score(rewards, texts, [prompts.examples[i] for i in rows], [prompts.where[i] for i in rows])
    total = values @ np.array([r.weight for r in rewards], dtype=np.float64)
    return Group(ids, completions, logps, group_advantages(total, opts.num_generations), values)


def group_advantages(rewards: np.ndarray, size: int) -> np.ndarray:
    """(reward − group mean) / (group std + 1e-4), rows in consecutive groups of ``size``."""
    grouped = rewards.reshape(-1, size)
    mean = grouped.mean(axis=1, keepdims=True)
    std = grouped.std(axis=1, ddof=1, keepdims=True) if size > 1 else np.zeros_like(mean)
    return ((grouped - mean) / (std + 1e-4)).reshape(-1)


def build_batch(group: Group, pad_id: int) -> Batch:
    """Rows of prompt + completion, right-padded; only completion tokens are labelled.

    ``old_logps`` and ``advantages`` are shaped like ``input_ids``, the value of token ``t`` at ``t``.
    """
    lengths = [len(p) + len(c) for p, c in zip(group.prompts, group.completions, strict=True)]
    rows, width = len(lengths), max(lengths)
    ids = np.full((rows, width), pad_id, dtype=np.int64)
    mask = np.zeros((rows, width), dtype=np.int64)
    labels = np.full((rows, width), IGNORE, dtype=np.int64)
    old = np.zeros((rows, width), dtype=np.float32)
    advantages = np.zeros((rows, width), dtype=np.float32)
    for row, (prompt, completion, logps) in enumerate(zip(group.prompts, group.completions, group.logps,
                                                          strict=True)):  # fmt: skip
        start, end = len(prompt), len(prompt) + len(completion)
        ids[row, :start], ids[row, start:end] = prompt, completion
        mask[row, :end] = 1
        labels[row, start:end] = completion
        old[row, start:end] = logps
        advantages[row, start:end] = group.advantages[row]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "old_logps": old, "advantages": advantages}


def reward_metrics(groups: Sequence[Group], rewards: Sequence[Reward]) -> dict[str, float]:
    """``reward`` (the weighted sum) and each function's ``reward/<label>``: mean and std over the step's rows."""
    values = np.concatenate([g.rewards for g in groups])
    total = values @ np.array([r.weight for r in rewards], dtype=np.float64)
    lengths = np.array([len(c) for g in groups for c in g.completions], dtype=np.float64)
    out: dict[str, Any] = {"reward": float(total.mean()), "reward_std": float(total.std())}
    for j, reward in enumerate(rewards):
        out[f"reward/{reward.label}"] = float(values[:, j].mean())
        out[f"reward/{reward.label}_std"] = float(values[:, j].std())
    out["completion_length"] = float(lengths.mean())
    out["completion_length_max"] = float(lengths.max())
    return out
