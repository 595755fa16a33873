"""The ``coreml`` target: a Core ML ML Program (``model.mlpackage``) of the merged model.

The graph takes ``input_ids``, ``position_ids`` and an additive ``causal_mask``
(1×1×T×T, 0 on and below the diagonal, -1e9 above) for any length T up to
``MAX_LENGTH`` and returns ``logits``.  The mask is an input because
transformers builds its own mask with ops coremltools can't convert.
The tokenizer and chat template are saved beside the package.

coremltools converts on Linux, but only macOS can run a Core ML model: here
verification checks the tokenizer, the template and the model's spec, and
marks the logits comparison as skipped; on macOS it runs the model too.
"""

from __future__ import annotations

import platform
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.errors import ModelError
from tunelab.export.merge import Merged
from tunelab.export.pipeline import Written
from tunelab.hub import save_tokenizer

PACKAGE = "model.mlpackage"
MAX_LENGTH = 2048
INPUTS: tuple[str, ...] = ("input_ids", "position_ids", "causal_mask")


def write(folder: Path, merged: Merged, out: Path, quantize: str | None) -> Written:
    """Convert the merged model with coremltools and save it with its tokenizer into ``out``."""
    precision = quantize or "float32"
    try:
        import coremltools as ct
    except ImportError:
        raise ModelError("--to coreml needs coremltools", hint='pip install "tunelab[export]"') from None
    _register_int_cast()
    traced = _trace(merged.model)
    length = ct.RangeDim(1, MAX_LENGTH, default=4, symbol="sequence")
    inputs = [
        ct.TensorType(name="input_ids", shape=(1, length), dtype=np.int32),
        ct.TensorType(name="position_ids", shape=(1, length), dtype=np.int32),
        ct.TensorType(name="causal_mask", shape=(1, 1, length, length), dtype=np.float32),
    ]
    compute = ct.precision.FLOAT32 if precision == "float32" else ct.precision.FLOAT16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            mlmodel = ct.convert(
                traced,
                inputs=inputs,
                outputs=[ct.TensorType(name="logits")],
                convert_to="mlprogram",
                compute_precision=compute,
                minimum_deployment_target=ct.target.macOS14,
            )
        except Exception as exc:
            raise ModelError(f"coremltools could not convert this model ({type(exc).__name__}: {exc})") from None
    out.mkdir(parents=True, exist_ok=True)
    mlmodel.save(str(out / PACKAGE))
    save_tokenizer(merged.tokenizer, out)  # keeps the SentencePiece legacy flag
    check_spec(out / PACKAGE)
    notes = (
        [] if platform.system() == "Darwin" else ["converted and spec-checked; Core ML runs the model only on macOS"]
    )
    return Written(out, precision, lambda: CoreMLRuntime(out), notes=notes)


def _trace(model: Any) -> Any:
    import torch

    class WithMask(torch.nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: Any, position_ids: Any, causal_mask: Any) -> Any:
            out = self.inner(
                input_ids=input_ids, position_ids=position_ids, attention_mask=causal_mask, use_cache=False
            )
            return out.logits

    ids = torch.tensor([[1, 2, 3, 4]])
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(WithMask(model).eval(), (ids, torch.arange(4)[None], causal_mask(4)), strict=False)


def causal_mask(length: int) -> Any:
    """The additive mask the graph expects, as a torch tensor."""
    import torch

    return torch.triu(torch.full((length, length), -1e9), 1)[None, None]


def _register_int_cast() -> None:
    """Replace coremltools' ``int`` cast, which breaks on NumPy 2 for traced one-element shape tensors.

    coremltools 9 calls ``int(array)`` on a folded (1,)-shaped constant; NumPy 2
    refuses that.  Same semantics, via ``reshape(())``.
    """
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    def _int(context: Any, node: Any) -> None:
        (x,) = _get_inputs(context, node, expected=1)
        if x.can_be_folded_to_const():
            res = mb.const(val=np.int32(np.asarray(x.val).reshape(())), name=node.name)
        else:
            flat = mb.squeeze(x=x, name=node.name + "_item") if len(x.shape) else x
            res = mb.cast(x=flat, dtype="int32", name=node.name)
        context.add(res, node.name)

    register_torch_op(_int, torch_alias=["int"], override=True)


def check_spec(package: Path) -> None:
    """The saved package is an ML Program with the inputs and output this module promises."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    names = tuple(i.name for i in spec.description.input)
    outputs = tuple(o.name for o in spec.description.output)
    if spec.WhichOneof("Type") != "mlProgram" or names != INPUTS or outputs != ("logits",):
        raise ModelError(f"the Core ML package has inputs {names} and outputs {outputs}, not {INPUTS} -> logits")


class CoreMLRuntime:
    """The package as Core ML runs it (macOS only); the tokenizer saved beside it everywhere."""

    def __init__(self, folder: Path) -> None:
        from tunelab.hub import load_tokenizer

        self.tokenizer = load_tokenizer(folder)
        self.folder = folder
        self.skip_reason = None if platform.system() == "Darwin" else "Core ML models run only on macOS"
        self.model: Any = None
        if self.skip_reason is None:
            import coremltools as ct

            self.model = ct.models.MLModel(str(folder / PACKAGE))

    def tokenize(self, text: str, *, add_special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def logits(self, ids: list[int]) -> np.ndarray:
        n = len(ids)
        feed = {
            "input_ids": np.array([ids], dtype=np.int32),
            "position_ids": np.arange(n, dtype=np.int32)[None],
            "causal_mask": causal_mask(n).numpy().astype(np.float32),
        }
        return np.asarray(self.model.predict(feed)["logits"][0], dtype=np.float32)

    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None)
