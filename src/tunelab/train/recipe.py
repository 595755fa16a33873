"""One fine-tuning run's lifecycle: set up → train → save.  No registry, no terminal.

Small factory functions turn the config into the plain specs the backend and
loop take; the service layer wraps this with registry records and callbacks.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.backends.base import Backend, Batch, MethodSpec, ModelInfo, ModelSpec, ObjectiveSpec, OptimSpec
from tunelab.backends.select import Choice, choose_backend, is_mlx_quantized, make_backend, model_type_of
from tunelab.config.schema import RunConfig, objective_data_problem
from tunelab.data.batching import BatchPlan, MicroBatchStream, eval_batches
from tunelab.data.packing import packed_eval_batches
from tunelab.data.preference import units_for
from tunelab.data.prepare import PreparedData, prepare_data, scan_data
from tunelab.data.sources import SUFFIXES
from tunelab.data.templates import BUILTIN_NAME, CHATML
from tunelab.distributed.group import SOLO, Group, launched_by_mlx, main_first
from tunelab.distributed.sharding import DataParallel, check_parallel
from tunelab.errors import ConfigError, StateError
from tunelab.hub import load_tokenizer, resolve_model_path
from tunelab.memory.plan import PLAN_FILE, MemoryPlan, plan_run
from tunelab.train.backoff import memory_hints
from tunelab.train.callbacks import BaseCallback
from tunelab.train.checkpoint import Resumed, TrainerState, resume_checkpoint
from tunelab.train.loop import LoopOptions, LoopResult, run_loop
from tunelab.train.reference import precompute_reference
from tunelab.train.schedules import make_schedule, warmup_steps
from tunelab.vocab import PREFERENCE_OBJECTIVES, WHOLE_MODEL_METHODS

_RUN_FILES = ("metrics.jsonl", PLAN_FILE)  # what a run that stopped early leaves in its own folder


@dataclass
class Prepared:
    """Everything set up and ready to train, with the one config the run trains with (batch settled)."""

    cfg: RunConfig
    choice: Choice
    backend: Backend
    info: ModelInfo
    data: PreparedData
    stream: MicroBatchStream | None  # None for GRPO, which samples its rows (see ``grpo``)
    valid: Sequence[Batch] | None
    total_steps: int
    state: TrainerState
    resumed_from: Path | None
    memory: MemoryPlan | None = None  # the estimate, and the batch size actually used
    parallel: DataParallel = field(default_factory=DataParallel)  # this process's share of each global micro-batch
    skipped: list[str] = field(default_factory=list)  # damaged checkpoints passed over on resume, and why
    grpo: Any = None  # objective grpo: its prompts, rewards and tokenizer (tunelab.train.grpo_setup.GrpoRun)


def model_spec(
    cfg: RunConfig, memory: MemoryPlan | None = None, processes: int = 1, longest_row: int | None = None
) -> ModelSpec:
    m = cfg.model
    estimate = memory.estimate if memory is not None else None
    return ModelSpec(
        m.path,
        m.dtype,
        m.revision,
        m.trust_remote_code,
        m.attn_implementation,
        cfg.device,
        gradient_checkpointing=cfg.train.gradient_checkpointing,
        compile=cfg.train.compile,
        fused_loss=cfg.train.fused_loss,
        activation_budget=cfg.train.activation_budget,
        packing=cfg.data.packing,
        longest_row=longest_row,
        offload_activations=cfg.train.offload_activations,
        offload_checkpoints=cfg.train.offload_checkpoints,
        offload_embeddings=cfg.train.offload_embeddings,
        offload_mlp=cfg.train.offload_mlp,
        tiled_mlp=True if cfg.train.tiled_mlp is True else "auto" if cfg.tiles_mlp else False,
        memory_limit_bytes=estimate.total if estimate is not None else None,
        parallel=cfg.train.parallel,
        processes=processes,
    )


def method_spec(cfg: RunConfig) -> MethodSpec:
    m = cfg.method
    targets = m.targets if isinstance(m.targets, str) else tuple(m.targets)
    return MethodSpec(
        *(m.name, m.rank, m.alpha, m.dropout, targets, m.layers, m.num_virtual_tokens, cfg.train.seed),
        bits=m.bits,
        group_size=m.group_size,
    )


def objective_spec(cfg: RunConfig) -> ObjectiveSpec:
    o, unset = cfg.objective, ObjectiveSpec()  # a knob the objective doesn't read is None in the config
    return ObjectiveSpec(
        name=o.name,
        beta=o.beta if o.beta is not None else unset.beta,
        gamma=o.gamma if o.gamma is not None else unset.gamma,
        alpha=o.alpha if o.alpha is not None else unset.alpha,
        precompute_ref=o.precompute_ref,
        epsilon=o.epsilon if o.epsilon is not None else unset.epsilon,
    )


def optim_spec(cfg: RunConfig) -> OptimSpec:
    return OptimSpec(weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm)


def total_steps(cfg: RunConfig, batches_per_epoch: int) -> int:
    if cfg.train.steps is not None:
        return cfg.train.steps
    epochs = cfg.train.epochs if cfg.train.epochs is not None else 1.0
    return max(1, math.ceil(epochs * batches_per_epoch / cfg.train.grad_accum))


def setup(
    cfg: RunConfig,
    output_dir: Path,
    *,
    resume: bool,
    on_data: Callable[[PreparedData], None],
    group: Group = SOLO,
) -> Prepared:
    """Check the data first (small data fails in a second), then tokenizer, data, model and state.

    Big data is validated while it is tokenized (or not at all on a cache hit), still before the model loads.
    With several processes rank 0 tokenizes first, so the others read its cache instead of racing it.
    GRPO (which samples its training rows) is set up by :mod:`tunelab.train.grpo_setup`.
    """
    if cfg.objective.name == "grpo":
        from tunelab.train.grpo_setup import setup_grpo

        return setup_grpo(cfg, output_dir, resume=resume, on_data=on_data, group=group)  # type: ignore[no-any-return]
    source = scan_data(cfg.data)
    check_objective(cfg.objective.name, source.format, group.world)
    folder = resolve_model_path(cfg.model.path, cfg.model.revision)
    quantized = is_mlx_quantized(folder)
    choice = choose_backend(cfg.backend, cfg.method.name, model_type=model_type_of(folder), mlx_quantized=quantized)
    check_parallel(cfg.train.parallel, choice.name, group.world, mlx_launch=launched_by_mlx())
    tokenizer = load_tokenizer(folder, trust_remote_code=cfg.model.trust_remote_code)
    with main_first(group):
        data = prepare_data(cfg.data, tokenizer, source, seed=cfg.train.seed)
    if data.template_name == BUILTIN_NAME:
        tokenizer.chat_template = CHATML  # saved with the adapter, so export and chat use what training used
    on_data(data)
    cfg, memory = plan_run(cfg, folder, choice.name, data.train, output_dir, resume=resume)  # before loading
    backend = make_backend(choice)
    lengths = data.train.lengths
    spec = model_spec(cfg, memory, group.world, int(lengths.max()) if len(lengths) else None)
    info = backend.load(spec, method_spec(cfg), optim_spec(cfg), tokenizer, objective_spec(cfg))
    if cfg.objective.precompute_ref:  # before any checkpoint loads: the model is still the reference
        rows = 2 * (cfg.train.eval_batch_size or cfg.train.micro_batch_size)
        for split in (data.train, data.valid):
            if split is not None:
                precompute_reference(backend, split, rows, tokenizer.pad_token_id)
    resumed = Resumed()
    if resume:  # the newest checkpoint that verifies and loads; rank 0 alone tidies the folder
        resumed = resume_checkpoint(output_dir / "checkpoints", backend.load_checkpoint, tidy=group.rank == 0)
    state = resumed.state
    # The data order is over global micro-batches; a checkpoint keeps their size, so a
    # run resumed on another number of processes still sees the same batches.
    state.global_batch = state.global_batch or cfg.train.micro_batch_size * group.world
    stream, valid = _batches(cfg, data, tokenizer.pad_token_id, state.global_batch)
    steps = total_steps(cfg, stream.batches_per_epoch)
    # A preference unit (a pair, or a KTO example and its KL row) is two rows of a micro-batch.
    rows_per_unit = 2 if cfg.objective.name in PREFERENCE_OBJECTIVES else 1
    parallel = DataParallel(group, cfg.train.micro_batch_size * rows_per_unit, even=cfg.train.parallel == "fsdp")
    return Prepared(
        cfg, choice, backend, info, data, stream, valid, steps, state, resumed.path, memory, parallel, resumed.skipped
    )


def _batches(
    cfg: RunConfig, data: PreparedData, pad_id: int, rows: int
) -> tuple[MicroBatchStream, Sequence[Batch] | None]:
    """The training stream (``rows`` per global micro-batch) and the validation batches, packed when asked."""
    plan = BatchPlan(rows, cfg.train.seed, cfg.data.shuffle, cfg.data.group_by_length)
    pack_to = cfg.data.max_seq_len if cfg.data.packing else None
    units = units_for(data.format, data.train, pad_id, cfg.data.max_seq_len)  # preference: pairs stay whole
    stream = MicroBatchStream(data.train, plan, pad_id, pack_to=pack_to, units=units)
    eval_bs = cfg.train.eval_batch_size or cfg.train.micro_batch_size
    if not data.valid:
        return stream, None
    valid_units = units_for(data.format, data.valid, pad_id, cfg.data.max_seq_len)
    if pack_to is not None:
        return stream, packed_eval_batches(data.valid, eval_bs, pack_to, pad_id, valid_units)
    return stream, eval_batches(data.valid, eval_bs, pad_id, valid_units)


def check_objective(objective: str, fmt: str, world: int) -> None:
    """The detected data format must suit the objective (checked before the tokenizer or model load)."""
    problem = objective_data_problem(objective, fmt)
    if problem is not None:
        raise ConfigError(problem, hint="the format was detected from the first record of data.train")
    if objective in PREFERENCE_OBJECTIVES and world > 1:
        raise ConfigError(
            f"objective {objective} trains in one process for now (a pair must not be split between processes)",
            hint="run it without --nproc",
        )


def train(prep: Prepared, output_dir: Path, callbacks: BaseCallback, should_stop: Callable[[], bool]) -> LoopResult:
    """Run the loop; on completion write the final adapter (or model) atomically."""
    if prep.grpo is not None:
        from tunelab.train.grpo_setup import train_grpo

        result = train_grpo(prep, output_dir, callbacks, should_stop)
        if result.status == "completed":
            save_result(prep.backend, result_dir(output_dir, prep.cfg.method.name))
        return result
    assert prep.stream is not None
    cfg, steps = prep.cfg, prep.total_steps
    schedule = make_schedule(
        cfg.train.scheduler, lr=cfg.train.lr, total_steps=steps, warmup=warmup_steps(cfg.train.warmup, steps)
    )
    opts = LoopOptions(
        total_steps=steps,
        grad_accum=cfg.train.grad_accum,  # settled by the memory plan (batch_size: auto)
        eval_every=cfg.train.eval_every,
        save_every=cfg.train.save_every,
        log_every=cfg.train.log_every,
        keep_checkpoints=cfg.train.keep_checkpoints,
        checkpoint_dir=output_dir / "checkpoints",
        sample_every=cfg.train.sample_every,
        sampler=_sampler(prep, callbacks) if cfg.train.sample_every else None,
        scorer=_scorer(prep, callbacks) if cfg.train.eval_metrics else None,
        memory_hints=memory_hints(
            checkpointing=cfg.train.gradient_checkpointing,
            offload=cfg.train.offload_checkpoints,
            method=cfg.method.name,
        ),
    )
    if prep.stream.packed:
        callbacks.on_message(
            f"packing: {len(prep.data.train)} examples in rows of up to {cfg.data.max_seq_len} tokens; "
            f"{prep.stream.token_efficiency:.1%} of the tokens trained on are real (not padding)"
        )
    result = run_loop(
        prep.backend, prep.stream, prep.valid, schedule, opts, prep.state, callbacks, should_stop, prep.parallel
    )
    if result.status == "completed" and prep.parallel.group.rank == 0:  # the weights are the same on every rank
        save_result(prep.backend, result_dir(output_dir, cfg.method.name))
    elif result.status == "completed" and getattr(prep.backend, "collective_saves", False):
        # FSDP: this rank's shards join the gather of the adapter; rank 0 alone writes it.
        prep.backend.save_adapter(result_dir(output_dir, cfg.method.name))
    return result


def _sampler(prep: Prepared, callbacks: BaseCallback) -> Any:
    """``train.sample_every``'s prompts (given, or the validation data's first three) ready to answer."""
    from tunelab.train.samples import build_sampler
    from tunelab.vocab import CHAT_FORMATS

    cfg = prep.cfg
    if prep.parallel.group.world > 1:
        callbacks.on_message("train.sample_every: no samples with several processes (one rank can't generate alone)")
        return None
    prompts = list(cfg.train.sample_prompts) or _first_prompts(prep.data.valid_path or prep.data.train_path)
    if not prompts:
        callbacks.on_message("train.sample_every: no prompts (set train.sample_prompts for plain-text data)")
        return None
    tokenizer = prep.backend.tokenizer  # type: ignore[attr-defined]  # both backends keep the one they trained with
    chat = prep.data.format in CHAT_FORMATS
    return build_sampler(prompts, tokenizer=tokenizer, chat=chat, max_new_tokens=cfg.train.sample_max_new_tokens)


def _scorer(prep: Prepared, callbacks: BaseCallback) -> Any:
    """``train.eval_metrics`` on the first ``eval_metrics_samples`` examples of the validation file."""
    from tunelab.errors import DataError
    from tunelab.evaluate.examples import load_examples
    from tunelab.evaluate.metrics import resolve
    from tunelab.train.samples import build_scorer
    from tunelab.vocab import CHAT_FORMATS

    cfg = prep.cfg
    if prep.parallel.group.world > 1:
        callbacks.on_message("train.eval_metrics: not with several processes (one rank can't generate alone)")
        return None
    if prep.valid is None or prep.data.valid_path is None:
        callbacks.on_message("train.eval_metrics: needs a validation file (data.valid, or a valid file in the folder)")
        return None
    try:
        examples = load_examples(prep.data.valid_path, fmt=prep.data.format, limit=cfg.train.eval_metrics_samples)
    except DataError as exc:  # plain text, preference pairs: no answers to score
        callbacks.on_message(f"train.eval_metrics: off ({exc.message})")
        return None
    tokenizer = prep.backend.tokenizer  # type: ignore[attr-defined]  # both backends keep the one they trained with
    chat, metrics = prep.data.format in CHAT_FORMATS, resolve(cfg.train.eval_metrics)
    longest = cfg.train.sample_max_new_tokens
    return build_scorer(examples, metrics, tokenizer=tokenizer, chat=chat, max_new_tokens=longest)


def _first_prompts(path: str, count: int = 3) -> list[str]:
    """The questions of the first ``count`` examples (a chat's last user turn, a completion's prompt)."""
    from tunelab.errors import DataError
    from tunelab.evaluate.examples import load_examples

    try:
        examples = load_examples(path, limit=count)
    except DataError:  # plain text, preference pairs: nothing to ask
        return []
    users = [[m for m in e.messages if m.get("role") == "user"] for e in examples]
    return [str(u[-1]["content"]) if u else e.prompt for u, e in zip(users, examples, strict=True)]


def result_dir(output_dir: Path, method: str) -> Path:
    """Adapters go to ``adapter/``; full and freeze runs produce a whole model in ``model/``."""
    return output_dir / ("model" if method in WHOLE_MODEL_METHODS else "adapter")


def save_result(backend: Backend, final: Path) -> None:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    backend.save_adapter(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def check_fresh_output(output_dir: Path, cfg: RunConfig | None = None) -> None:
    """Never train over another run's results, nor into a folder holding a model or a dataset (``cfg``'s own
    or any other): checkpoints and results would land among files someone relies on."""
    for name in ("adapter", "model", "checkpoints"):
        if (output_dir / name).exists():
            raise StateError(
                f"output_dir {output_dir} already holds a run ({name}/ exists)",
                hint="choose another output_dir, or continue that run with `tunelab train --resume RUN_ID`",
            )
    holds = _held_inputs(output_dir, cfg)
    if holds:
        raise StateError(
            f"output_dir {output_dir} holds {holds}; a run writes only into a folder of its own",
            hint="leave output_dir out (the run gets one under the runs folder) or name a new folder",
        )


def _held_inputs(output_dir: Path, cfg: RunConfig | None) -> str | None:
    """What input ``output_dir`` holds or is: a model checkpoint, data files, or the run's own model or data."""
    out = output_dir.expanduser().resolve()
    if cfg is not None:
        for label, given in (("the run's model", cfg.model.path), ("the run's data", cfg.data.train)):
            path = Path(given).expanduser()
            if path.exists() and (path.resolve() == out or out in path.resolve().parents):
                return label
    if not out.is_dir():
        return None
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return "a model checkpoint"
    data = sorted(
        p.name for p in out.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES and p.name not in _RUN_FILES
    )
    return f"data files ({', '.join(data[:3])})" if data else None
