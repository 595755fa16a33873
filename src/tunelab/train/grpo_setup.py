"""Setting up and running a GRPO run (``objective.name: grpo``): the recipe's ``setup``/``train`` for it.

The order puts the cheap checks first: the reward functions are imported, then the prompts read and
validated (file/line errors), all before the model loads.  GRPO runs on torch or MLX, in one process.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.backends.select import choose_backend, is_mlx_quantized, make_backend, model_type_of
from tunelab.config.schema import RunConfig
from tunelab.data.grpo import GrpoData, read_grpo
from tunelab.data.prepare import PreparedData
from tunelab.data.templates import BUILTIN_NAME, CHATML, template_for
from tunelab.distributed.group import SOLO, Group
from tunelab.errors import ConfigError
from tunelab.hub import load_tokenizer, resolve_model_path
from tunelab.inference import prompt_token_ids, stop_ids
from tunelab.train.callbacks import BaseCallback
from tunelab.train.checkpoint import Resumed, resume_checkpoint
from tunelab.train.grpo import GrpoOptions, run_grpo
from tunelab.train.loop import LoopResult
from tunelab.train.rewards import Reward, resolve_rewards
from tunelab.train.schedules import make_schedule, warmup_steps


def setup_grpo(
    cfg: RunConfig, output_dir: Path, *, resume: bool, on_data: Callable[[PreparedData], None], group: Group = SOLO
) -> Any:
    """Rewards, prompts, tokenizer and model, ready to train: a ``recipe.Prepared`` with ``grpo`` set."""
    from tunelab.train import recipe  # the recipe dispatches here; imported late to keep the modules acyclic

    rewards = resolve_rewards(cfg.objective.rewards or [])  # an unimportable function: before anything loads
    if group.world > 1:
        raise ConfigError("objective grpo trains in one process for now", hint="run it without --nproc")
    folder = resolve_model_path(cfg.model.path, cfg.model.revision)
    quantized = is_mlx_quantized(folder)
    choice = choose_backend(cfg.backend, cfg.method.name, model_type=model_type_of(folder), mlx_quantized=quantized)
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
    _, template_name = template_for(tokenizer)
    if template_name == BUILTIN_NAME:
        tokenizer.chat_template = CHATML  # saved with the adapter, so chat uses what sampling used

    def encode(messages: list[dict[str, Any]], chat: bool) -> list[int]:
        return prompt_token_ids(tokenizer, messages, chat=chat)

    max_new = cfg.objective.max_new_tokens or 64
    data = read_grpo(cfg.data, encode, max_new)
    on_data(_prepared(data, template_name))
    backend = make_backend(choice)
    spec = recipe.model_spec(cfg)
    if choice.name == "mlx":
        # MLX's compiled step measured 7.6x slower here than its head-split one (197 vs 26 ms a step, tiny
        # model, 2 CPU cores), and sampled rows change width from step to step: GRPO takes the eager step.
        spec = dataclasses.replace(spec, compile=False)
    info = backend.load(spec, recipe.method_spec(cfg), recipe.optim_spec(cfg), tokenizer, recipe.objective_spec(cfg))
    resumed = Resumed()
    if resume:
        resumed = resume_checkpoint(output_dir / "checkpoints", backend.load_checkpoint, tidy=True)
    per_step = cfg.train.micro_batch_size * cfg.train.grad_accum
    epochs = cfg.train.epochs if cfg.train.epochs is not None else 1.0
    steps = cfg.train.steps or max(1, math.ceil(epochs * len(data.train) / per_step))
    prep = recipe.Prepared(
        cfg, choice, backend, info, _prepared(data, template_name), None, None, steps, resumed.state,
        resumed.path, skipped=resumed.skipped,
    )  # fmt: skip
    prep.grpo = GrpoRun(data, rewards, tokenizer)
    return prep


class GrpoRun:
    """What a GRPO run needs beyond the recipe's ``Prepared``: its prompts, rewards and tokenizer."""

    def __init__(self, data: GrpoData, rewards: list[Reward], tokenizer: Any) -> None:
        self.data = data
        self.rewards = rewards
        self.tokenizer = tokenizer


def train_grpo(prep: Any, output_dir: Path, callbacks: BaseCallback, should_stop: Callable[[], bool]) -> LoopResult:
    """Run the GRPO loop from ``prep`` (see :func:`setup_grpo`)."""
    cfg, steps, run = prep.cfg, prep.total_steps, prep.grpo
    o, tokenizer = cfg.objective, run.tokenizer
    schedule = make_schedule(
        cfg.train.scheduler, lr=cfg.train.lr, total_steps=steps, warmup=warmup_steps(cfg.train.warmup, steps)
    )
    opts = GrpoOptions(
        total_steps=steps,
        grad_accum=cfg.train.grad_accum,
        prompts_per_micro=cfg.train.micro_batch_size,
        num_generations=o.num_generations,
        max_new_tokens=o.max_new_tokens,
        temperature=o.temperature,
        seed=cfg.train.seed,
        shuffle=cfg.data.shuffle,
        save_every=cfg.train.save_every,
        eval_every=cfg.train.eval_every,
        log_every=cfg.train.log_every,
        keep_checkpoints=cfg.train.keep_checkpoints,
        checkpoint_dir=output_dir / "checkpoints",
        stop_ids=tuple(stop_ids(tokenizer)),
        pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0,
        decode=lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
    )
    callbacks.on_message(
        f"grpo: {len(run.data.train)} prompts, {opts.prompts_per_micro * opts.grad_accum} per step, "
        f"{opts.num_generations} completions each (up to {opts.max_new_tokens} tokens); rewards: "
        + ", ".join(f"{r.name} × {r.weight:g}" for r in run.rewards)
    )
    return run_grpo(prep.backend, run.data.train, run.rewards, schedule, opts, prep.state, callbacks, should_stop,
                    valid=run.data.valid)  # fmt: skip


def _prepared(data: GrpoData, template_name: str) -> PreparedData:
    """What the registry records of the data (the prompts as a token split; nothing is cached)."""
    valid = data.valid.as_split() if data.valid is not None else None
    return PreparedData(data.train.as_split(), valid, "grpo", template_name, data.train_path, data.valid_path,
                        data.content_hash, cache_status="unused")  # fmt: skip
