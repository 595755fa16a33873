"""The MLX implementation of the :class:`~tunelab.backends.base.Backend` protocol.

Models come from mlx-lm's architecture files (loaded from HF checkpoints as
they are); the method, optimizer, loss and checkpoint format are tunelab's, so
an MLX run mirrors a torch run of the same config step for step.
"""

from __future__ import annotations

import copy
import json
import resource
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.backends.base import Batch, LossSum, MethodSpec, ModelInfo, ModelSpec, ObjectiveSpec, OptimSpec
from tunelab.backends.lora_init import lora_a_init
from tunelab.backends.mlx.blas import ensure_fast_blas
from tunelab.backends.mlx.hf_config import rope_fixes
from tunelab.backends.peft_format import read_adapter
from tunelab.errors import ConfigError, ModelError, StateError
from tunelab.hub import architecture_of, resolve_model_path
from tunelab.vocab import IGNORE, LORA_METHODS

ensure_fast_blas()  # must precede the first `import mlx.core` on Linux (see blas.py)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import mlx.optimizers as optim  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from tunelab.backends.mlx import checkpoint_io, oom  # noqa: E402
from tunelab.backends.mlx.checkpoint_io import flat  # noqa: E402
from tunelab.backends.mlx.forward import checkpoint_class, split_head  # noqa: E402
from tunelab.backends.mlx.generate import stream_tokens  # noqa: E402
from tunelab.backends.mlx.grpo import grpo_targets, sample_completions  # noqa: E402
from tunelab.backends.mlx.layers import LoRALinear, linear_modules, set_module  # noqa: E402
from tunelab.backends.mlx.objectives import MlxLoss, loss_for, token_cross_entropy  # noqa: E402
from tunelab.backends.mlx.packing import enable_packing, packed_caches  # noqa: E402
from tunelab.backends.mlx.preference import adapters_off, preference_targets, reference_rows  # noqa: E402
from tunelab.backends.mlx.quant import in_features, prepare_base, set_memory_limits  # noqa: E402

_PAD_MULTIPLE = 32
_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


class MlxBackend:
    """mlx-lm model + tunelab's LoRA/DoRA/full/freeze + AdamW, on Apple GPUs or a CPU."""

    name = "mlx"

    def __init__(self) -> None:
        self.model: Any = None
        self.tokenizer: Any = None
        self.folder = Path()
        self.method = MethodSpec()
        self._adapters: dict[str, LoRALinear] = {}
        self._optimizer: Any = None
        self._grads: Any = None
        self._max_grad_norm = 1.0
        self._micro = 0  # micro-batches seen: dropout RNG is reseeded from it, so resume is exact
        self._distributed = False  # one of several processes (mlx.launch): set from the spec at load
        self._loss_and_grad: Any = None
        self._objective: MlxLoss = token_cross_entropy
        self._head: Any = None  # output projection, when the decoder/head split reproduces the logits
        self._pad_multiple = 1
        self._pad_id = 0
        self._mask_rank = 0  # > 0 once packed batches are enabled (the rank of their attention mask)
        self._ref_model: Any = None  # full/freeze preference runs: a frozen copy of the base (and its head)
        self._ref_head: Any = None

    # -- setup -------------------------------------------------------------------------------
    def load(
        self,
        model: ModelSpec,
        method: MethodSpec,
        optim_spec: OptimSpec,
        tokenizer: Any,
        objective: ObjectiveSpec = ObjectiveSpec(),
    ) -> ModelInfo:
        self._objective = loss_for(objective)  # first: an objective this backend lacks fails before any loading
        if model.tiled_mlp is True:
            raise ConfigError(
                "train.tiled_mlp: true is for the torch backend; MLX checkpoints whole blocks instead",
                hint="set train.tiled_mlp: auto (or false), or backend: torch",
            )
        self._load_base(model, tokenizer)
        self.method = method
        self._distributed = model.processes > 1
        prepare_base(self.model, method.name, method.bits or 4, method.group_size)
        set_memory_limits(model.memory_limit_bytes)
        self._apply_method(method)
        self._max_grad_norm = optim_spec.max_grad_norm
        self._optimizer = optim.AdamW(
            learning_rate=0.0,
            betas=list(optim_spec.betas),
            eps=optim_spec.eps,
            weight_decay=optim_spec.weight_decay,
            bias_correction=True,  # torch's AdamW corrects the moment bias; parity needs the same
        )
        if model.gradient_checkpointing:
            for layer in self.model.model.layers:
                checkpoint_class(type(layer))
        if model.packing:
            self._mask_rank = enable_packing(self.model)
        self._build_step(compile_step=model.compile)
        reference = getattr(self._objective, "needs_reference", False) and not objective.precompute_ref
        if reference and method.name not in LORA_METHODS:  # the weights themselves train: keep the base
            self._ref_model = copy.deepcopy(self.model)
            self._ref_head = split_head(self._ref_model) if self._head is not None else None
        return self._info(trainable=sum(v.size for v in flat(self.model.trainable_parameters()).values()))

    def _apply_method(self, method: MethodSpec) -> None:
        """Freeze the base and make trainable what ``method`` trains (adapters, every weight, the last layers)."""
        self.model.freeze()
        if method.name in LORA_METHODS:
            self._wrap(method)
        elif method.name == "full":
            self.model.unfreeze()
        elif method.name == "freeze":
            layers = self.model.model.layers
            if method.layers > len(layers):
                raise ConfigError(f"method.layers: the model has only {len(layers)} layers (got {method.layers})")
            for layer in layers[len(layers) - method.layers :]:
                layer.unfreeze()
        else:
            raise ConfigError(
                f"method.name: {method.name} is not available on the MLX backend", hint="use backend: torch"
            )

    def _build_step(self, *, compile_step: bool) -> None:
        """The loss-and-gradient function a micro-batch runs: compiled, or with the head on supervised rows only."""
        loss_and_grad = nn.value_and_grad(self.model, self._loss)
        if compile_step:
            # One compiled graph per batch shape; batches are padded to a multiple of
            # _PAD_MULTIPLE so there are few shapes.  Variable-length gathers would
            # retrace every step, so the compiled path projects every position.
            state = [self.model.state, mx.random.state]
            compiled = mx.compile(
                lambda ids, targets, *packed: loss_and_grad(self.model, ids, targets, None, *packed),
                inputs=state,
                outputs=state,
            )
            self._loss_and_grad = lambda _model, ids, targets, _picked, *packed: compiled(ids, targets, *packed)
            self._pad_multiple = _PAD_MULTIPLE
        else:
            self._head = split_head(self.model)
            self._loss_and_grad = loss_and_grad

    def load_inference(self, model: ModelSpec, adapter: Path | None, tokenizer: Any) -> ModelInfo:
        self._load_base(model, tokenizer)
        if adapter is not None:
            spec, tensors = read_adapter(adapter)
            self.method = MethodSpec("dora" if spec.use_dora else "lora", spec.rank, spec.alpha, 0.0)
            for path, parts in tensors.items():
                layer = self._wrap_one(path, spec.rank, spec.alpha, 0.0, spec.use_dora, seed=0)
                layer.load_peft_tensors(parts)
        self.model.eval()
        return self._info(trainable=0)

    def _load_base(self, spec: ModelSpec, tokenizer: Any) -> None:
        from mlx_lm.utils import load_model

        self.folder = resolve_model_path(spec.path, spec.revision)
        config = json.loads((self.folder / "config.json").read_text(encoding="utf-8"))
        try:
            self.model, _ = load_model(
                self.folder, model_config=rope_fixes(config), trust_remote_code=spec.trust_remote_code
            )
        except (ValueError, FileNotFoundError) as exc:
            raise ModelError(f"mlx-lm could not load {self.folder}: {exc}", hint="try backend: torch") from None
        dtype = _DTYPES.get(spec.dtype) if spec.dtype != "auto" else _auto_dtype(self.model)
        if dtype is not None:
            self.model.set_dtype(dtype)
        self.tokenizer = tokenizer
        self._pad_id = int(tokenizer.pad_token_id or 0)

    def _wrap(self, method: MethodSpec) -> None:
        targets = method.targets
        for path in linear_modules(self.model):
            leaf = path.split(".")[-1]
            if targets == "all-linear" or leaf in targets or path in targets:
                self._wrap_one(path, method.rank, method.alpha, method.dropout, method.name == "dora", method.seed)
        if not self._adapters:
            raise ConfigError(f"method.targets: no linear layer of this model matches {targets}")
        for layer in self._adapters.values():
            layer.unfreeze(keys=layer.trainable_names(), recurse=False)

    def _wrap_one(self, path: str, rank: int, alpha: float, dropout: float, dora: bool, seed: int) -> LoRALinear:
        base = dict(linear_modules(self.model)).get(path)
        if base is None:
            raise ModelError(f"the adapter names module {path}, which this model does not have")
        in_dims = in_features(base)
        layer = LoRALinear(
            base, rank=rank, alpha=alpha, dropout=dropout, a_init=lora_a_init(seed, path, rank, in_dims), dora=dora
        )
        set_module(self.model, path, layer)
        self._adapters[path] = layer
        return layer

    def _info(self, *, trainable: int) -> ModelInfo:
        params = sum(v.size for v in flat(self.model.parameters()).values())
        device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        floats = (v.dtype for v in flat(self.model.parameters()).values() if mx.issubdtype(v.dtype, mx.floating))
        dtype = str(next(floats, "?")).removeprefix("mlx.core.")  # not embed_tokens: it may be quantized
        bits = {m.bits for _, m in self.model.named_modules() if isinstance(m, nn.QuantizedLinear)}
        if bits:
            dtype = f"{max(bits)}bit/{dtype}"
        return ModelInfo(architecture_of(self.folder), params, trainable, dtype, f"mlx:{device}", str(self.folder))

    # -- training ----------------------------------------------------------------------------
    def prepare_batch(self, batch: Batch, waiting: int) -> None:
        return None  # nothing to do ahead: MLX copies nothing to a device

    def forward_backward(self, batch: Batch, loss_scale: float) -> LossSum:
        self.model.train()
        mx.random.seed((self.method.seed * 1_000_003 + self._micro) % 2**32)
        self._micro += 1
        (loss, tokens, *stats), grads = self._loss_and_grad(self.model, *self._with_reference(self._inputs(batch)))
        grads = tree_map(lambda g: g * loss_scale, grads)
        self._grads = grads if self._grads is None else tree_map(mx.add, self._grads, grads)
        mx.eval(loss, tokens, self._grads, stats)
        return LossSum(float(loss), int(tokens), _numbers(stats))

    def optimizer_step(self, lr: float) -> float:
        if self._distributed:  # several processes (mlx.launch): each holds its share's gradient
            from tunelab.backends.mlx.group import sum_gradients

            self._grads = sum_gradients(self._grads, self.model.trainable_parameters())
        limit = self._max_grad_norm if self._max_grad_norm > 0 else float("inf")
        grads, norm = optim.clip_grad_norm(self._grads, limit)
        self._optimizer.learning_rate = lr
        self._optimizer.update(self.model, grads)
        mx.eval(self.model.parameters(), self._optimizer.state, norm)
        self._grads = None
        return float(norm)

    def eval_loss(self, batch: Batch) -> LossSum:
        self.model.eval()
        loss, tokens, *stats = self._loss(self.model, *self._with_reference(self._inputs(batch)))
        mx.eval(loss, tokens, stats)
        return LossSum(float(loss), int(tokens), _numbers(stats))

    def reference_logprobs(self, batch: Batch) -> np.ndarray:
        self.model.eval()
        return reference_rows(self._reference_logits, batch, picked=self._head is not None)

    def _with_reference(self, inputs: tuple[Any, ...]) -> tuple[Any, ...]:
        """A preference (GRPO) batch's targets with each sequence's (token's) reference log-prob, unless precomputed."""
        targets = inputs[1]
        if (
            isinstance(targets, dict)
            and getattr(self._objective, "needs_reference", False)
            and "ref_seq" not in targets
        ):
            logits = self._reference_logits(inputs[0], inputs[2], *inputs[3:])
            self._objective.add_reference(targets, logits)  # type: ignore[attr-defined]
        return inputs

    def _reference_logits(self, ids: mx.array, picked: mx.array | None, *packed: mx.array) -> mx.array:
        """The reference model's logits: the frozen copy, or this model with its adapters switched off."""
        if self._ref_model is not None:
            return self._logits(self._ref_model, self._ref_head, ids, picked, *packed)
        with adapters_off(self.model, self._adapters):
            return self._logits(self.model, self._head, ids, picked, *packed)

    # -- persistence -------------------------------------------------------------------------
    def save_adapter(self, path: Path) -> None:
        checkpoint_io.save_result(path, self.model, self.method, self._adapters, self.folder, self.tokenizer)

    def save_checkpoint(self, path: Path) -> None:
        checkpoint_io.save_checkpoint(path, self.model, self._optimizer, self._micro)

    def load_checkpoint(self, path: Path) -> None:
        self._micro = checkpoint_io.load_checkpoint(path, self.model, self._optimizer)

    # -- inference ---------------------------------------------------------------------------
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        stop_ids: Sequence[int],
        seed: int,
    ) -> Iterator[int]:
        return stream_tokens(
            self.model,
            prompt_ids,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            stop_ids=stop_ids,
            seed=seed,
        )

    def sample_completions(self, prompts: Sequence[Sequence[int]], **how: Any) -> tuple[list[list[int]], list[Any]]:
        """GRPO: complete each prompt row; ids and log-probs (see ``grpo.sample_completions``)."""
        return sample_completions(self.model, prompts, **how)

    def is_out_of_memory(self, exc: BaseException) -> bool:
        return oom.is_out_of_memory(exc)

    def release_memory(self) -> None:
        self._grads = None  # the failed step's partial sum
        oom.release()

    def peak_memory_bytes(self) -> int | None:
        if mx.default_device() == mx.gpu:
            return int(mx.get_peak_memory())
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)

    def _inputs(self, batch: Batch) -> tuple[Any, ...]:
        """(ids, targets, picked supervised positions or None[, positions, segments when packed])."""
        ids_np, labels_np = _pad_to(batch["input_ids"], batch["labels"], self._pad_multiple, self._pad_id)
        ids = mx.array(ids_np.astype(np.int32))
        targets = labels_np[:, 1:]
        packed = self._packed_inputs(batch, ids_np.shape[1])
        if "roles" in batch:  # preference: scored positions, their sequences and roles (a dict of targets)
            pref, scored = preference_targets(batch, ids_np.shape[1], picked=self._head is not None)
            return ids, pref, scored, *packed
        if "old_logps" in batch:  # GRPO: each completion token's sampling-time log-prob and advantage
            return ids, *grpo_targets(batch, ids_np.shape[1], picked=self._head is not None), *packed
        if self._head is None:
            return ids, mx.array(targets.astype(np.int32)), None, *packed
        # Flat positions of the supervised tokens, found in numpy: only they go through the head.
        picked = np.flatnonzero(targets.reshape(-1) != IGNORE).astype(np.int32)
        return ids, mx.array(targets.reshape(-1)[picked].astype(np.int32)), mx.array(picked), *packed

    def _packed_inputs(self, batch: Batch, width: int) -> tuple[mx.array, ...]:
        """Positions and example ids, padded like the ids (extra padding joins the padding example 0)."""
        if "segment_ids" not in batch:
            return ()
        if not self._mask_rank:
            raise StateError("a packed batch reached an MLX backend loaded without packing=True")
        extra = ((0, 0), (0, width - batch["input_ids"].shape[1]))
        positions = np.pad(batch["position_ids"], extra).astype(np.int32)
        segments = np.pad(batch["segment_ids"], extra).astype(np.int32)
        return mx.array(positions), mx.array(segments)

    def _loss(self, model: Any, ids: mx.array, targets: Any, picked: mx.array | None, *packed: mx.array) -> Any:
        """The objective's summed loss over supervised positions, and how many there are (and diagnostics)."""
        return self._objective(self._logits(model, self._head, ids, picked, *packed), targets)

    def _logits(self, model: Any, head: Any, ids: mx.array, picked: mx.array | None, *packed: mx.array) -> mx.array:
        """float32 logits at every position but the last, or at the ``picked`` (flat) positions alone.

        With ``picked`` the decoder's hidden states at supervised positions alone are
        projected to the vocabulary (same sum, far less head compute under prompt masking).
        ``packed`` (positions, example ids) keeps attention and RoPE per example.
        """
        cache = packed_caches(model, packed[0], packed[1], self._mask_rank) if packed else None
        if picked is not None:
            hidden = model.model(ids, cache=cache)[:, :-1]
            hidden = hidden.reshape(-1, hidden.shape[-1])[picked]
            return head(hidden).astype(mx.float32)
        return model(ids, cache=cache)[:, :-1].astype(mx.float32)


def _numbers(stats: list[Any]) -> dict[str, tuple[float, float]]:
    """A preference objective's diagnostics (the loss's third output, if any) as Python numbers."""
    return {name: (float(total), float(count)) for name, (total, count) in stats[0].items()} if stats else {}


def _pad_to(ids: np.ndarray, labels: np.ndarray, multiple: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad to a multiple of ``multiple``: extra positions get no loss and, being last, no influence."""
    width = -(-ids.shape[1] // multiple) * multiple
    if width == ids.shape[1]:
        return ids, labels
    extra = width - ids.shape[1]
    return (
        np.pad(ids, ((0, 0), (0, extra)), constant_values=pad_id),
        np.pad(labels, ((0, 0), (0, extra)), constant_values=IGNORE),
    )


def _auto_dtype(model: Any) -> Any:
    """fp32 on a CPU (bf16 matmuls there are slow and lossy); the checkpoint's dtype on Apple GPUs."""
    return mx.float32 if mx.default_device() == mx.cpu else None
