"""Turn a base model into a trainable one: PEFT adapters, full, or the last N layers."""

from __future__ import annotations

from typing import Any

import torch

from tunelab.backends.base import MethodSpec
from tunelab.backends.lora_init import lora_a_init
from tunelab.backends.torch.loading import decoder_layers
from tunelab.errors import ConfigError
from tunelab.vocab import ADAPTER_METHODS, LORA_METHODS


def apply_method(model: Any, spec: MethodSpec) -> Any:
    """Return the model to train; adapter methods wrap it in a PEFT model."""
    torch.manual_seed(spec.seed)  # adapter init must be a function of the run's seed
    if spec.name in ADAPTER_METHODS:
        return _peft(model, spec)
    for param in model.parameters():
        param.requires_grad_(spec.name == "full")
    if spec.name == "freeze":
        layers = decoder_layers(model)
        if spec.layers > len(layers):
            raise ConfigError(f"method.layers: the model has only {len(layers)} layers (got {spec.layers})")
        for layer in layers[len(layers) - spec.layers :]:
            for param in layer.parameters():
                param.requires_grad_(True)
    return model


def _peft(model: Any, spec: MethodSpec) -> Any:
    from peft import IA3Config, LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    targets: Any = spec.targets if isinstance(spec.targets, str) else list(spec.targets)
    if spec.name in LORA_METHODS:
        config: Any = LoraConfig(
            r=spec.rank,
            lora_alpha=spec.alpha,  # type: ignore[arg-type]  # PEFT accepts float scaling
            lora_dropout=spec.dropout,
            target_modules=targets,
            use_dora=spec.name == "dora",
            task_type=TaskType.CAUSAL_LM,
        )
    elif spec.name == "ia3":
        # PEFT knows the right (attention, feed-forward) modules per architecture; a list overrides it.
        modules = None if targets == "all-linear" else targets
        config = IA3Config(
            target_modules=modules,
            feedforward_modules=[] if modules is not None else None,
            task_type=TaskType.CAUSAL_LM,
        )
    else:
        config = PrefixTuningConfig(num_virtual_tokens=spec.num_virtual_tokens, task_type=TaskType.CAUSAL_LM)
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as exc:
        raise ConfigError(f"method.targets: {exc}", hint="use all-linear or module names the model has") from None
    if spec.name in LORA_METHODS:
        _shared_lora_init(peft_model, spec.seed)
    return peft_model


def _shared_lora_init(peft_model: Any, seed: int) -> None:
    """Replace PEFT's torch-RNG draws of ``lora_A`` with the backend-independent ones."""
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                weight: Any = module.lora_A["default"].weight
                path = name.removeprefix("base_model.model.")
                init = lora_a_init(seed, path, weight.shape[0], weight.shape[1])
                weight.copy_(torch.from_numpy(init).to(weight.dtype))
