"""From a run config to a memory estimate, a fits-or-not verdict and a concrete batch size.

`tunelab estimate` calls :func:`estimate_config` (no data read, nothing loaded:
the longest sequence ``data.max_seq_len`` and every position supervised, the
worst case); `tunelab train` calls :func:`plan_run` after tokenizing, so the
estimate uses the real longest example and the real share of supervised
tokens, before any weight is loaded.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.config.schema import RunConfig
from tunelab.data.tokenize import TokenizedSplit
from tunelab.errors import ConfigError, ModelError, TunelabError
from tunelab.memory.autobatch import SAFETY, choose_batch
from tunelab.memory.budget import Budget, device_budget
from tunelab.memory.estimate import Estimate, estimate
from tunelab.memory.shapes import SCALED_EMBEDDINGS, ModelShape, read_shape
from tunelab.memory.workload import DTYPE_BYTES, GiB, Workload
from tunelab.vocab import IGNORE

_SCANNED = 4096  # longest examples whose supervised tokens are counted
PLAN_FILE = "memory.json"  # in the run's folder: a resumed auto run keeps the batch it started with


PEAK_TOLERANCE = 0.15  # measured peak vs estimate beyond which a run's log says so


@dataclass(frozen=True)
class MemoryPlan:
    """What a run will use and whether it fits; ``batch_size``/``grad_accum`` are final."""

    estimate: Estimate | None
    budget: Budget
    batch_size: int
    grad_accum: int
    auto: bool
    problem: str = ""  # why there is no estimate

    @property
    def fits(self) -> bool | None:
        if self.estimate is None or self.budget.bytes is None:
            return None
        return self.estimate.total <= self.budget.bytes

    def summary(self) -> str:
        """One line for the run's log."""
        batch = f"batch {self.batch_size} × grad_accum {self.grad_accum}" + (" (auto)" if self.auto else "")
        if self.estimate is None:
            return f"memory: no estimate ({self.problem}); {batch}"
        have = f" of {_gib(self.budget.bytes)} ({self.budget.source})" if self.budget.bytes else ""
        verdict = {True: "fits", False: "may NOT fit: see `tunelab estimate`", None: "capacity unknown"}[self.fits]
        return f"memory: estimated peak {_gib(self.estimate.total)}{have}, {verdict}; {batch}"

    def measured(self, peak: int | None, tolerance: float = PEAK_TOLERANCE) -> str | None:
        """A warning for the run's log when the measured ``peak`` is more than ``tolerance`` off the estimate.

        ``batch_size: auto`` and the "fits" verdict rest on the estimate, so a large miss is worth
        saying where the user sees it (and reporting: the estimator should model that run).
        """
        if self.estimate is None or not peak or not self.estimate.peak_bytes:
            return None
        expected = self.estimate.peak_bytes  # like for like: tensors on a GPU, the whole process on a CPU
        off = peak / expected - 1
        if abs(off) <= tolerance:
            return None
        return (
            f"memory: the measured peak {_gib(peak)} is {abs(off):.0%} {'above' if off > 0 else 'below'} the "
            f"estimate {_gib(expected)}; batch_size: auto and the fits check rely on the estimate"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "estimate": self.estimate.to_dict() if self.estimate else None,
            "workload": asdict(self.estimate.workload) if self.estimate else None,
            "budget": asdict(self.budget),
            "fits": self.fits,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "auto": self.auto,
            "problem": self.problem,
        }


def load_shape(path: str, revision: str | None = None) -> ModelShape:
    """The architecture of a local checkpoint, or of a hub id from its config.json alone (no weights)."""
    local = Path(path).expanduser()
    if local.is_dir() or local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1:
        from tunelab.hub import resolve_model_path

        return read_shape(resolve_model_path(path, revision))  # a folder, or the error that says what is wrong
    from huggingface_hub import hf_hub_download

    from tunelab.hub import require_hub

    for offline in (True, False):  # the HF cache first: no network when the model was used before
        if not offline:
            require_hub(f"model.path: the config.json of {path} is not in the local Hugging Face cache")
        try:
            return read_shape(
                Path(hf_hub_download(path, "config.json", revision=revision, local_files_only=offline)).parent
            )
        except TunelabError:
            raise
        except Exception as exc:
            problem = f"{type(exc).__name__}"
    raise ModelError(
        f"model.path: the config.json of {path} is not in the local Hugging Face cache and could not be downloaded"
        f" ({problem})",
        hint="check the id and your connection, or point model.path at a local checkpoint folder",
    )


def target_device(requested: str, backend: str) -> str:
    """The device a run of ``backend`` would use here: cuda | mps | cpu, or metal | cpu for MLX."""
    from tunelab.backends.select import detect_environment

    env = detect_environment(probe_torch=backend == "torch" and requested == "auto")
    if backend == "mlx":
        return "metal" if env.mlx_metal else "cpu"
    return requested if requested != "auto" else env.torch_device


def compute_dtype(requested: str, backend: str, device: str, shape: ModelShape) -> str:
    """What ``model.dtype: auto`` resolves to, as the backends resolve it."""
    if requested != "auto":
        return requested
    if device == "cpu":
        return "float32"
    if backend == "torch":
        return "bfloat16" if device == "cuda" else "float32"
    return shape.checkpoint_dtype if shape.checkpoint_dtype in DTYPE_BYTES else "bfloat16"


def workload(cfg: RunConfig, shape: ModelShape, *, backend: str, device: str, **fields: Any) -> Workload:
    """The estimator's view of a config; ``fields`` override (batch, seq_len, supervised, bits)."""
    m, t = cfg.method, cfg.train
    batch = t.batch_size if isinstance(t.batch_size, int) else 1
    base = Workload(
        backend=backend,
        device=device,
        dtype=compute_dtype(cfg.model.dtype, backend, device, shape),
        method=m.name,
        rank=m.rank,
        targets=m.targets if isinstance(m.targets, str) else tuple(m.targets),
        dropout=m.dropout > 0,
        trained_layers=m.layers,
        num_virtual_tokens=m.num_virtual_tokens,
        # An MLX-quantized checkpoint stays as stored (qlora does not quantize it again).
        bits=shape.quant_bits or m.bits,
        group_size=shape.quant_group_size if shape.quant_bits else m.group_size,
        batch=batch,
        seq_len=cfg.data.max_seq_len,
        gradient_checkpointing=t.gradient_checkpointing,
        grad_accum=t.grad_accum,
        compiled=backend == "mlx" and t.compile,
        compiled_layers=backend == "torch" and device == "cuda" and t.compile,
        activation_budget=t.activation_budget,
        fast_loss=m.name != "prefix",  # prefix tuning takes the model's own (full) logits
        offload_activations=t.offload_activations and backend == "torch" and device == "cuda",
        offload_checkpoints=bool(t.offload_checkpoints)
        and t.gradient_checkpointing
        and backend == "torch"
        and device == "cuda"
        and t.parallel != "fsdp"
        and m.name != "prefix",
    )
    host = t.offload_embeddings is True or (t.offload_embeddings == "auto" and base.offload_checkpoints)
    host = host and backend == "torch" and device == "cuda" and _host_table_fits(shape, m.name)
    # As backends/torch/kept_attention.py: sdpa over unpacked rows (packed rows take a varlen kernel).
    kept = base.offload_checkpoints and not cfg.data.packing and cfg.model.attn_implementation != "eager"
    base = replace(base, host_embeddings=host, tiled_mlp=backend == "torch" and cfg.tiles_mlp, kept_attention=kept)
    return replace(base, **fields)


def _host_table_fits(shape: ModelShape, method: str) -> bool:
    """Whether the backend can keep this model's input embeddings in CPU memory (as backends/torch/offload.py)."""
    return method not in ("full", "prefix") and not shape.tied_embeddings and shape.model_type not in SCALED_EMBEDDINGS


def estimate_config(
    cfg: RunConfig, *, device: str | None = None, budget_bytes: int | None = None, bits: int | None = None
) -> MemoryPlan:
    """`tunelab estimate`: the worst-case estimate for ``cfg`` on this machine (or on ``device``)."""
    from tunelab.backends.select import choose_backend

    shape = load_shape(cfg.model.path, cfg.model.revision)
    if device in ("cuda", "mps"):
        backend = "torch"
    elif device == "metal":
        backend = "mlx"
    else:
        quantized = bool(shape.quant_bits)  # an MLX-quantized checkpoint: only mlx loads it
        backend = choose_backend(
            cfg.backend, cfg.method.name, model_type=shape.model_type or None, mlx_quantized=quantized
        ).name
    where = device or target_device(cfg.device, backend)
    budget = _budget(backend, where, budget_bytes)
    work = workload(cfg, shape, backend=backend, device=where, **({"bits": bits} if bits else {}))
    return _settle(cfg, shape, work, budget)


def plan_run(
    cfg: RunConfig, folder: Path, backend: str, train: TokenizedSplit, output_dir: Path, *, resume: bool
) -> tuple[RunConfig, MemoryPlan]:
    """Estimate before loading; resolve ``batch_size: auto``; return the config to train with.

    An estimate that can't be made (an architecture it does not cover) is no
    reason to stop a run with a fixed batch size; with ``auto`` it is.
    """
    where = target_device(cfg.device, backend)
    budget = device_budget(backend, where)
    saved = _saved_plan(output_dir) if resume and cfg.train.batch_size == "auto" else None
    try:
        shape = read_shape(folder)
        seq_len, supervised = data_extent(train, cfg.data.max_seq_len, packed=cfg.data.packing)
        work = workload(cfg, shape, backend=backend, device=where, seq_len=seq_len, supervised=supervised)
        if saved is not None:
            cfg = _with_batch(cfg, *saved)
            work = replace(work, batch=saved[0], grad_accum=saved[1])
        plan = _settle(cfg, shape, work, budget)
        plan = replace(plan, auto=saved is not None or plan.auto)
    except TunelabError as exc:
        if cfg.train.batch_size == "auto" and saved is None:
            raise ConfigError(
                f"train.batch_size: auto needs a memory estimate, and none could be made: {exc.message}",
                hint="set train.batch_size to a number",
            ) from None
        size, accum = saved or (int(cfg.train.batch_size), cfg.train.grad_accum)
        plan = MemoryPlan(None, budget, size, accum, cfg.train.batch_size == "auto", exc.message)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / PLAN_FILE).write_text(json.dumps(plan.to_dict(), indent=2), encoding="utf-8")
    return _with_batch(cfg, plan.batch_size, plan.grad_accum), plan


def data_extent(split: TokenizedSplit, max_seq_len: int, *, packed: bool) -> tuple[int, float]:
    """(padded length of the longest batch, the largest share of its positions that carry loss).

    Supervision is counted on the longest examples only (they make the peak
    batch), so a large memory-mapped dataset is not read end to end for this.
    """
    if len(split) == 0:
        return max_seq_len, 1.0
    lengths = split.lengths
    longest = np.argsort(-lengths, kind="stable")[:_SCANNED]
    supervised = np.array([int((split.labels[int(i)][1:] != IGNORE).sum()) for i in longest], dtype=np.int64)
    if packed:  # rows are filled up to max_seq_len with examples of every supervision ratio
        return max_seq_len, float(min(1.0, (supervised / np.maximum(lengths[longest] - 1, 1)).max()))
    seq_len = int(min(lengths.max(), max_seq_len))
    return seq_len, float(min(1.0, supervised.max() / max(seq_len - 1, 1)))


def _settle(cfg: RunConfig, shape: ModelShape, work: Workload, budget: Budget) -> MemoryPlan:
    """Choose the batch (when auto) and make the final estimate."""
    if cfg.train.batch_size != "auto":
        return MemoryPlan(estimate(shape, work), budget, work.batch, work.grad_accum, auto=False)
    if budget.bytes is None:
        raise ConfigError(
            f"train.batch_size: auto can't tell how much memory the {budget.device} has ({budget.source})",
            hint="set train.batch_size to a number",
        )
    effective = cfg.train.effective_batch

    def peak(size: int) -> int:
        return estimate(shape, replace(work, batch=size, grad_accum=effective // size)).total

    chosen = choose_batch(peak, budget.bytes, effective, safety=SAFETY)
    final = replace(work, batch=chosen.batch_size, grad_accum=chosen.grad_accum)
    return MemoryPlan(estimate(shape, final), budget, chosen.batch_size, chosen.grad_accum, auto=True)


def _budget(backend: str, device: str, override: int | None) -> Budget:
    if override is not None:
        return Budget(device, override, "given with --memory")
    return device_budget(backend, device)


def _with_batch(cfg: RunConfig, batch_size: int, grad_accum: int) -> RunConfig:
    """The config with its batch settled: a fixed micro-batch and accumulation (what the run trains with,
    and what the registry stores, so a resume never plans again)."""
    settled = {"batch_size": batch_size, "grad_accum": grad_accum, "effective_batch_size": None}
    train = cfg.train.model_copy(update=settled)
    return cfg.model_copy(update={"train": train})


def _saved_plan(output_dir: Path) -> tuple[int, int] | None:
    try:
        saved = json.loads((output_dir / PLAN_FILE).read_text(encoding="utf-8"))
        return int(saved["batch_size"]), int(saved["grad_accum"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _gib(n: int | None) -> str:
    return "?" if n is None else f"{n / GiB:.1f} GiB"
