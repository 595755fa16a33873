"""The run config: one frozen pydantic model per section.

These keys are a public contract (other tools, the API and the dashboard read
and write them), so names and meanings only ever grow; cross-field rules live
here, in one place, so every entry point validates the same way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tunelab.config.objective import ObjectiveCfg, RewardCfg
from tunelab.config.objective import Section as _Section
from tunelab.vocab import (
    OBJECTIVE_FORMATS,
    PREFERENCE_OBJECTIVES,
    AnswerMetric,
    DataFormat,
    MethodName,
    TrainOn,
)

Scheduler = Literal["constant", "linear", "cosine"]
BackendName = Literal["auto", "torch", "mlx"]
DeviceName = Literal["auto", "cuda", "mps", "cpu"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


# The largest step count or interval the registry can hold (a 32-bit INTEGER column on PostgreSQL):
# bounded here, so a value past it is a config error with its range, not a traceback or an overflow later.
MAX_INT = 2**31 - 1


# Micro-batch tokens from which train.tiled_mlp: auto tiles the MLPs (an 8B Llama's MLP intermediates then pass 1 GiB).
TILED_MLP_FROM = 16_384
MLP_TILE_TOKENS = 4096  # positions per tile (backends/torch/tiled_mlp.py; the estimator models the same)

# train.activation_budget's default: the share of a compiled layer's activations the partitioner keeps for
# backward (below 1 it recomputes the cheapest of the rest).  0.9 keeps the same set as 0.8 on an 8B Llama.
ACTIVATION_BUDGET = 0.8

# The chunked loss (backends/torch/linear_ce.py; the estimator models the same chunks).  Elements of one
# chunk's fp32 logits: 2**25 is 128 MiB, e.g. 256 positions of a 128k vocabulary.
LOSS_CHUNK_ELEMENTS = 2**25
# A chunk's positions are a multiple of this.  They are a matrix dimension of the head's two products, which
# GPU kernels cover in tiles of 64-256 rows: 261 positions (a 128k vocabulary) end each chunk's products in a
# mostly empty tile, 256 don't, and a micro-batch of 2^k positions then splits into equal chunks, so the
# compiled chunk keeps one static shape.  (Not measured on its own: bench/gpu_env.sh's switch chunk_any.)
LOSS_CHUNK_ROW_MULTIPLE = 64


def loss_chunk_rows(vocab: int) -> int:
    """How many positions one chunk of the chunked loss projects, for a head of ``vocab`` outputs."""
    rows = LOSS_CHUNK_ELEMENTS // max(vocab, 1)
    return max(LOSS_CHUNK_ROW_MULTIPLE, rows // LOSS_CHUNK_ROW_MULTIPLE * LOSS_CHUNK_ROW_MULTIPLE)


class ModelCfg(_Section):
    """Which base model to fine-tune and how to hold it in memory."""

    path: str = Field(description="local HF checkpoint dir, or a hub id (resolved via the HF cache)")
    dtype: DType = Field("auto", description="weights dtype; auto = bf16 on CUDA if supported, else fp32")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")
    trust_remote_code: bool = Field(False, description="allow custom modelling code from the checkpoint")
    attn_implementation: Literal["auto", "eager", "sdpa"] = Field(
        "auto", description="torch attention kernel: auto = tunelab's choice (varlen/SDPA where they apply)"
    )

    @field_validator("path")
    @classmethod
    def _non_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must name a local checkpoint folder or a hub id")
        return v


class DataCfg(_Section):
    """Where the examples come from and how they become token sequences."""

    train: str = Field(description="JSONL/JSON/CSV/Parquet file, or a folder with train/valid files")
    valid: str | None = Field(None, description="validation file; default: the folder's valid file")
    format: DataFormat = Field("auto", description="record format; auto = detected from the first records' keys")
    max_seq_len: int = Field(
        1024, ge=8, le=1_048_576, description="tokens per example (or packed row); longer examples are truncated"
    )
    mask_prompt: bool = Field(True, description="train only on completion/assistant tokens")
    shuffle: bool = Field(True, description="shuffle the examples each epoch (seeded by train.seed)")
    group_by_length: bool = Field(
        True, description="batch examples of similar length together to waste less compute on padding"
    )
    packing: bool = Field(False, description="pack several examples per sequence (attention kept per example)")
    train_on: TrainOn = Field("all_assistant", description="chat: which turns carry loss when mask_prompt is on")
    columns: dict[str, str] = Field(
        default_factory=dict, description="rename fields: {tunelab field: your field}, e.g. {prompt: question}"
    )
    valid_split: float = Field(
        0.0, ge=0.0, lt=1.0, description="carve this fraction of train as validation when no valid set is given"
    )
    split: str = Field("train", description="hub datasets: the split to train on")
    subset: str | None = Field(None, description="hub datasets: the configuration (subset) name")
    cache: bool = Field(True, description="reuse tokenized data from the cache when nothing it depends on changed")
    num_proc: int | None = Field(None, ge=1, le=512, description="tokenizer processes; default: all cores")


class MethodCfg(_Section):
    """What is trained: adapters (lora, dora, qlora, prefix, ia3) or base weights (full, freeze)."""

    name: MethodName = Field("lora", description="how the model is adapted (see the method guide)")
    rank: int = Field(8, ge=1, le=4096, description="lora/dora/qlora: rank of the low-rank update")
    alpha: float = Field(16.0, gt=0, description="lora/dora/qlora: the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="lora/dora/qlora: dropout on the adapter's input")
    targets: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="modules given adapters: all-linear, or names such as [q_proj, v_proj]"
    )
    layers: int = Field(2, ge=1, le=MAX_INT, description="freeze: how many of the last decoder layers to train")
    num_virtual_tokens: int = Field(16, ge=1, le=1024, description="prefix: virtual tokens per layer")
    bits: int | None = Field(None, description="qlora: the base's bits, 4 or 8 (default 4)")
    group_size: int = Field(64, description="qlora on MLX: weights per affine quantization group (32, 64, 128)")

    @field_validator("targets")
    @classmethod
    def _targets_non_empty(cls, v: str | list[str]) -> str | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError("must be 'all-linear' or a non-empty list of module names")
        return v

    @model_validator(mode="after")
    def _quantized(self) -> MethodCfg:
        # bits only means something for qlora; saying it with lora is almost surely a forgotten method name.
        if self.bits is not None and self.name != "qlora":
            raise ValueError(f"bits is for name: qlora (got name: {self.name}); remove bits or set name: qlora")
        if self.bits is not None and self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8 (got {self.bits})")
        if self.group_size not in (32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128 (got {self.group_size})")
        if self.name == "qlora" and self.bits is None:
            object.__setattr__(self, "bits", 4)  # the default depends on name; the model is frozen after this
        return self


class TrainCfg(_Section):
    """The optimisation schedule: length, batch, learning rate, evaluation and checkpoints."""

    steps: int | None = Field(None, ge=1, le=MAX_INT, description="optimizer steps; exclusive with epochs")
    epochs: float | None = Field(None, gt=0, le=10_000, description="passes over the data; exclusive with steps")
    batch_size: int | Literal["auto"] = Field(
        4, description="micro-batch size, or auto: the largest that fits this device (see effective_batch_size)"
    )
    effective_batch_size: int | None = Field(
        None, ge=1, le=1_048_576, description="batch_size auto: examples per optimizer step (default 4 × grad_accum)"
    )
    grad_accum: int = Field(1, ge=1, le=65_536, description="micro-batches per optimizer step")
    lr: float = Field(2e-4, gt=0, le=10.0, description="peak learning rate (AdamW)")
    scheduler: Scheduler = Field("cosine", description="learning-rate shape after the warm-up")
    warmup: float = Field(0, ge=0, description="warm-up steps (>= 1) or a fraction of all steps (< 1)")
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="AdamW's decoupled weight decay")
    max_grad_norm: float = Field(1.0, ge=0.0, description="clip gradients to this norm; 0 turns clipping off")
    seed: int = Field(0, ge=0, lt=2**32, description="seeds the adapter's initial weights, shuffling and dropout")
    eval_every: int = Field(0, ge=0, le=MAX_INT, description="steps between validations; 0 = only at the end")
    save_every: int = Field(0, ge=0, le=MAX_INT, description="steps between checkpoints; 0 = only at the end")
    keep_checkpoints: int = Field(2, ge=1, le=MAX_INT, description="newest checkpoints kept on disk")
    log_every: int = Field(1, ge=1, le=MAX_INT, description="steps between logged training metrics")
    sample_every: int = Field(
        0, ge=0, le=MAX_INT, description="steps between greedy answers to sample_prompts, logged beside the metrics "
        "(metrics.jsonl, the run's events, the dashboard); 0 = off"
    )  # fmt: skip
    sample_prompts: list[str] = Field(
        default_factory=list,
        max_length=32,
        description="what sample_every asks (user messages for chat data, prompts otherwise); "
        "default: the first 3 prompts of the validation data",
    )
    sample_max_new_tokens: int = Field(48, ge=1, le=4096, description="longest sample answer")
    eval_metrics: list[AnswerMetric] = Field(
        default_factory=list,
        description="metrics (as tunelab eval --metrics names them) of greedy answers to the first "
        "eval_metrics_samples validation examples, at each validation, logged as eval/<metric>; answers up to "
        "sample_max_new_tokens long",
    )
    eval_metrics_samples: int = Field(32, ge=1, le=100_000, description="validation examples eval_metrics scores")
    gradient_checkpointing: bool = Field(
        False, description="recompute activations in backward: less memory, ~30% slower"
    )
    compile: bool = Field(
        True, description="compile the training step (MLX) or each decoder layer (torch on CUDA); false runs eager"
    )
    activation_budget: float = Field(
        ACTIVATION_BUDGET,
        gt=0.0,
        le=1.0,
        description="torch on CUDA, compiled layers: share of activations kept for backward; the rest is "
        "recomputed, cheapest first (below 1: less memory, a little slower)",
    )
    fused_loss: bool = Field(
        True, description="torch: LM head + cross-entropy in chunks, without the whole batch's logits in memory"
    )
    eval_batch_size: int | None = Field(
        None, ge=1, le=MAX_INT, description="validation micro-batch; default: the training micro-batch"
    )
    offload_activations: bool = Field(
        False, description="CUDA: keep saved activations in pinned CPU memory during the forward (less GPU memory)"
    )
    offload_checkpoints: bool | Literal["auto"] = Field(
        "auto",
        description="with gradient_checkpointing on CUDA: each layer's saved input waits in pinned CPU memory, "
        "copied out and back while other layers compute, so GPU memory barely grows with sequence length; "
        "auto = on wherever it applies (CUDA, gradient_checkpointing, not fsdp or prefix)",
    )
    offload_embeddings: bool | Literal["auto"] = Field(
        "auto",
        description="CUDA, adapter methods: the frozen input-embedding table stays in pinned CPU memory and only "
        "the batch's rows are copied in (1 GiB less GPU memory for an 8B Llama); not for tied or scaled "
        "embeddings; auto = on wherever checkpoints are offloaded",
    )
    offload_mlp: bool | int | Literal["auto"] = Field(
        False,
        description="experimental, off by default (on an H200 it gave no speed and 0.45 GiB more GPU memory for an "
        "8B LoRA; it is meant for GPUs whose compute is slow beside their link to CPU memory); "
        "with offloaded checkpoints: the MLP activations (gate and up projections) of the first "
        "layers wait in pinned CPU memory too, so backward re-runs no MLP matrix product there (up to a "
        "quarter less matrix work per step for an 8B Llama); costs 4 x tokens x intermediate_size bytes of "
        "CPU memory per layer; true = every layer, a number = that many layers, auto = as many as the GPU's "
        "link to CPU memory copies while the forward computes (measured at start), wherever it applies "
        "(LoRA and 4-bit QLoRA on Llama, Mistral, Qwen, Granite-style MLPs, not tiled) and fits in half the "
        "free CPU memory",
    )
    tiled_mlp: bool | Literal["auto"] = Field(
        "auto",
        description="torch: each layer's MLP runs over tiles of 4,096 positions and saves only its input, so long "
        "rows need a fraction of the memory (costs a little time outside offloaded checkpoints); auto = on with "
        f"gradient_checkpointing when a micro-batch holds {TILED_MLP_FROM:,} tokens or more",
    )
    parallel: Literal["auto", "ddp", "fsdp"] = Field(
        "auto",
        description="several processes (torchrun, --nproc): ddp = each holds the model and trains on its share "
        "of every batch (batch_size is per process); fsdp = shard the base and adapters over the processes "
        "(torch FSDP2); auto = ddp",
    )

    @field_validator("offload_mlp")
    @classmethod
    def _offload_mlp(cls, v: bool | int | str) -> bool | int | str:
        if isinstance(v, int) and not isinstance(v, bool) and v < 0:
            raise ValueError("must be true, false, auto or a number of layers (0 or more)")
        return v

    @field_validator("batch_size", mode="before")
    @classmethod
    def _batch_size(cls, v: object) -> object:
        # One message for both forms (a union would report each branch's complaint).
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 65_536):
            return v
        raise ValueError("must be a whole number from 1 to 65536, or auto")

    @model_validator(mode="after")
    def _length(self) -> TrainCfg:
        if self.steps is not None and self.epochs is not None:
            raise ValueError("set train.steps or train.epochs, not both")
        return self

    @model_validator(mode="after")
    def _auto_batch(self) -> TrainCfg:
        # With batch_size auto the user asks for an effective batch; tunelab picks micro-batch × grad_accum.
        if self.effective_batch_size is None:
            return self
        if self.batch_size != "auto":
            raise ValueError("train.effective_batch_size goes with batch_size: auto; with a fixed size set grad_accum")
        if self.grad_accum != 1:
            raise ValueError("with batch_size: auto and effective_batch_size, grad_accum is chosen; remove grad_accum")
        return self

    @property
    def micro_batch_size(self) -> int:
        """The micro-batch size; ``auto`` must have been resolved first (tunelab.memory.plan does it)."""
        if self.batch_size == "auto":
            raise ValueError("train.batch_size: auto is resolved from the memory estimate before batching")
        return self.batch_size

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step that the user asked for."""
        if self.batch_size == "auto":
            return self.effective_batch_size or 4 * self.grad_accum
        return self.batch_size * self.grad_accum


_RECORDS = {
    "preference": '{"prompt", "chosen", "rejected"} records',
    "kto": '{"prompt", "completion", "label": true|false} records',
    "grpo": '{"prompt"} or {"messages"} records (plus the fields the reward functions read)',
}

__all__ = ["ObjectiveCfg", "RewardCfg", "RunConfig"]


def objective_data_problem(objective: str, fmt: str) -> str | None:
    """Why data of format ``fmt`` can't train ``objective`` (None when it can; ``auto`` is checked once detected)."""
    wanted = OBJECTIVE_FORMATS.get(objective)
    if fmt == "auto" or fmt == wanted:
        return None
    if wanted is not None:
        return (
            f"objective {objective} trains on data format {wanted} (got {fmt}); give "
            + _RECORDS[wanted]
            + f", set data.format: {wanted} or auto, or change objective.name"
        )
    if fmt in OBJECTIVE_FORMATS.values():
        names = ", ".join(name for name, f in OBJECTIVE_FORMATS.items() if f == fmt)
        return f"data format {fmt} trains with objective.name {names} (got {objective})"
    return None


def _check_grpo(cfg: RunConfig) -> None:
    """What GRPO can't do (yet): said when the config loads, not after the model did."""
    if cfg.method.name == "prefix":
        raise ValueError(
            "objective grpo can't train method prefix (its virtual tokens ride in the KV cache "
            "that sampling builds); use lora, dora, qlora, ia3, full or freeze"
        )
    if cfg.train.batch_size == "auto":
        raise ValueError(
            "objective grpo takes a fixed train.batch_size (prompts per micro-batch, each sampled "
            "objective.num_generations times); set train.batch_size: N"
        )
    if cfg.data.packing:
        raise ValueError("objective grpo does not pack (its rows are sampled, not read); remove data.packing")


class RunConfig(_Section):
    """A whole fine-tuning run, as written in YAML and overridden from the command line."""

    model: ModelCfg
    data: DataCfg
    method: MethodCfg = MethodCfg()
    objective: ObjectiveCfg = ObjectiveCfg()
    train: TrainCfg = TrainCfg()
    backend: BackendName = Field("auto", description="auto = MLX on Apple Silicon, else PyTorch")
    device: DeviceName = Field("auto", description="torch: auto = CUDA, then Apple MPS, then CPU")
    output_dir: str | None = Field(None, description="default: $TUNELAB_HOME/runs/<run id>")
    name: str | None = Field(None, max_length=200, description="a label for the run in lists and the dashboard")
    tensorboard: bool = Field(True, description="false turns TensorBoard's event files off even when tracking lists it")
    tracking: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        ["tensorboard"],
        description="where metrics go besides metrics.jsonl: tensorboard (event files in the run folder), wandb "
        "(WANDB_MODE=offline works without network), mlflow (MLFLOW_TRACKING_URI: a folder or a server)",
    )

    @model_validator(mode="after")
    def _objective_data(self) -> RunConfig:
        problem = objective_data_problem(self.objective.name, self.data.format)
        if problem is not None:
            raise ValueError(problem)
        if self.objective.name in PREFERENCE_OBJECTIVES and (
            not self.data.mask_prompt or self.data.train_on == "everything"
        ):
            raise ValueError(
                f"objective {self.objective.name} scores only the responses, never the prompt; "
                "remove data.mask_prompt: false and data.train_on: everything"
            )
        if self.objective.name == "grpo":
            _check_grpo(self)
        return self

    @property
    def tiles_mlp(self) -> bool:
        """Whether the run tiles its MLPs (``train.tiled_mlp``; auto: long micro-batches with checkpointing)."""
        t = self.train
        if t.tiled_mlp != "auto":
            return t.tiled_mlp
        batch = t.batch_size if isinstance(t.batch_size, int) else 1
        return (
            t.gradient_checkpointing
            and self.method.name != "prefix"
            and batch * self.data.max_seq_len >= TILED_MLP_FROM
        )

    def to_dict(self) -> dict:
        """Plain JSON-able dict (what the registry stores and the API returns)."""
        return self.model_dump(mode="json")
