"""The words every part of tunelab shares, defined once: methods, states, data formats, the ignore index.

The config schema, the backends, the memory model, the registry, the CLI, the
API and the dashboard all import these names instead of spelling the lists out,
so a method or a state added here reaches every one of them (and none drifts).
Plain data only: importing this module costs nothing.
"""

from __future__ import annotations

from typing import Literal, get_args

# --- methods -------------------------------------------------------------------------------------------------------
MethodName = Literal["lora", "dora", "qlora", "full", "freeze", "prefix", "ia3"]
METHODS: tuple[str, ...] = get_args(MethodName)
LORA_METHODS: tuple[str, ...] = ("lora", "dora", "qlora")
"""Low-rank adapters: they take ``rank``, ``alpha`` and ``dropout`` (qlora: LoRA over a quantized base)."""
ADAPTER_METHODS: tuple[str, ...] = (*LORA_METHODS, "prefix", "ia3")
"""Methods whose result is a PEFT adapter over the frozen base (saved in ``adapter/``)."""
WHOLE_MODEL_METHODS: tuple[str, ...] = ("full", "freeze")
"""Methods that change the base's own weights, so their result is a whole model (saved in ``model/``)."""

# --- objectives ----------------------------------------------------------------------------------------------------
ObjectiveName = Literal["sft", "dpo", "ipo", "orpo", "kto", "simpo", "grpo"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveName)
"""What a run's loss optimizes; each backend maps every name here to one loss function."""
PAIRWISE_OBJECTIVES: tuple[str, ...] = ("dpo", "ipo", "orpo", "simpo")
"""Objectives that compare a chosen and a rejected response to one prompt (data format ``preference``)."""
PREFERENCE_OBJECTIVES: tuple[str, ...] = (*PAIRWISE_OBJECTIVES, "kto")
"""Objectives whose loss is a mean over pairs (or KTO examples), not over tokens."""
REFERENCE_OBJECTIVES: tuple[str, ...] = ("dpo", "ipo", "kto")
"""Objectives that score the policy against a frozen reference model (orpo and simpo need none)."""
OBJECTIVE_FORMATS: dict[str, str] = {**dict.fromkeys(PAIRWISE_OBJECTIVES, "preference"), "kto": "kto", "grpo": "grpo"}
"""The data format each non-SFT objective trains on."""
RewardBuiltin = Literal["exact_match", "regex_match", "json_valid", "length_penalty"]
REWARD_BUILTINS: tuple[str, ...] = get_args(RewardBuiltin)
"""GRPO's built-in reward functions (``objective.rewards``), besides a user's own ``module:function``."""
# What each sequence of a preference batch is (``roles`` in a batch, one code per token; 0 = padding).
ROLE_CHOSEN, ROLE_REJECTED, ROLE_DESIRABLE, ROLE_UNDESIRABLE, ROLE_KL = 1, 2, 3, 4, 5

# --- runs and jobs -------------------------------------------------------------------------------------------------
RunStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
RUN_STATUSES: tuple[str, ...] = get_args(RunStatus)
JobStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)
FINAL_STATUSES: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
"""Run and job states that never change again (a run or job in one of them is over)."""
ACTIVE_STATUSES: tuple[str, ...] = tuple(s for s in RUN_STATUSES if s not in FINAL_STATUSES)
"""States of a run or job that is waiting or training (the dashboard keeps polling these)."""
JobKind = Literal["train", "validate", "eval"]
JOB_KINDS: tuple[str, ...] = get_args(JobKind)
RUN_OWNING_KINDS: tuple[str, ...] = ("train",)
"""Job kinds whose run is the one they produce: its status follows theirs (an eval job only reads its run)."""

# --- evaluation ----------------------------------------------------------------------------------------------------
AnswerMetric = Literal[
    "exact_match", "exact_match_raw", "contains", "regex_match", "json_valid", "numeric", "bleu", "rouge_l"
]
"""Built-in metrics scored on generated answers (what train.eval_metrics takes)."""
MetricName = Literal[AnswerMetric, "perplexity", "token_loss"]
EVAL_METRICS: tuple[str, ...] = get_args(MetricName)
"""`tunelab eval`'s built-in metrics by name (besides a user's own ``module:function``, which the API refuses)."""

# --- data ----------------------------------------------------------------------------------------------------------
DataFormat = Literal["auto", "text", "completion", "instruction", "chat", "sharegpt", "preference", "kto", "grpo"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
CHAT_FORMATS: tuple[str, ...] = ("chat", "instruction")
"""Record formats trained through the chat template (so generation applies it too)."""
TrainOn = Literal["last_assistant", "all_assistant", "everything"]
TRAIN_ON: tuple[str, ...] = get_args(TrainOn)
UPLOAD_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".csv", ".parquet")
"""File types the API and the dashboard accept as uploads."""

IGNORE = -100
"""The label of a position that carries no loss (PyTorch's and transformers' ``ignore_index``)."""
