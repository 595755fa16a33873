"""train.tiled_mlp: the MLP over tiles of positions gives the gradients of the whole MLP (dropout included),
and inside an offloaded checkpoint its replay computes no MLP output that nothing reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from tests.backends.conftest import load_backend
from tests.backends.conftest import random_batch as _batch

from tunelab.backends.base import MethodSpec
from tunelab.backends.torch.checkpointing import checkpoint_layers
from tunelab.backends.torch.loading import decoder_layers
from tunelab.backends.torch.tiled_mlp import tile_mlps
from tunelab.config import load_config


def _run(
    folder: Path,
    tokenizer: Any,
    *,
    tiled: bool,
    offload: bool | None,
    dropout: float,
    compiled: str | None = None,
    method: str = "lora",
    device: str = "cpu",
) -> tuple[float, dict, int]:
    """``offload``: True offloaded checkpoints, False checkpoints kept in place, None none; ``compiled``: the
    tiles' ``torch.compile`` backend (then the down projections' calls aren't counted: 0)."""
    spec = MethodSpec(method, dropout=dropout, bits=4 if method == "qlora" else None)
    backend = load_backend(folder, tokenizer, spec, device=device)
    base = backend._causal_lm
    if tiled:
        assert tile_mlps(base, tile_tokens=8, compile_backend=compiled) == len(decoder_layers(base))  # 48: 6 tiles
    if offload is not None:
        checkpoint_layers(decoder_layers(base), offload=offload)
        base.enable_input_require_grads()
    calls = [0]
    for layer in decoder_layers(base) if not compiled else ():  # dynamo would guard on the counter's value
        layer.mlp.down_proj.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    torch.manual_seed(2)
    loss = float(backend.forward_backward(_batch(), 1.0).loss_sum)  # on CUDA a pending read-back
    grads = {n: p.grad.clone() for n, p in backend.model.named_parameters() if p.grad is not None}
    return loss, grads, calls[0] // len(decoder_layers(base))


@pytest.mark.parametrize("offload", [None, False, True])
def test_tiled_mlp_gives_the_gradients_of_the_whole_mlp(
    tiny_model_dir: Path, tiny_tokenizer: Any, offload: bool | None
) -> None:
    loss, grads, _ = _run(tiny_model_dir, tiny_tokenizer, tiled=False, offload=offload, dropout=0.0)
    tiled_loss, tiled_grads, calls = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=offload, dropout=0.0)
    assert tiled_loss == pytest.approx(loss, rel=1e-6)
    assert tiled_grads.keys() == grads.keys() and any("mlp" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(tiled_grads[name], grad, rtol=1e-5, atol=1e-7)
    # forward in 6 tiles, backward in 6; a checkpoint's replay (Llama: residual + mlp) computes no value: 12, not 18
    assert calls == 12


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_only_a_tiled_mlp_that_can_draw_saves_the_random_state(
    tiny_model_dir: Path, tiny_tokenizer: Any, random_state_saves: list[int], dropout: float
) -> None:
    """Saving and restoring the generators costs host time in every layer; without dropout nothing is drawn again."""
    _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=None, dropout=dropout)
    assert random_state_saves[0] == (2 if dropout else 0)  # one forward of the two layers' tiled MLPs


def test_tiled_mlp_with_dropout_matches_its_checkpointed_replay(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """The offloaded layer's forward and the tiled backward draw the same dropout masks."""
    plain = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=None, dropout=0.3)
    offloaded = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=True, dropout=0.3)
    assert offloaded[0] == pytest.approx(plain[0], rel=1e-6)
    for name, grad in plain[1].items():
        torch.testing.assert_close(offloaded[1][name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("offload", [None, True])
def test_compiled_tiles_give_the_same_gradients_in_two_graphs_for_all_layers(
    tiny_model_dir: Path, tiny_tokenizer: Any, offload: bool | None
) -> None:
    """The tiles' compiled function: one graph for the forward's tiles (no gradients) and one for backward's."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    from tunelab.backends.torch import tiled_mlp

    eager = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=offload, dropout=0.0)
    torch._dynamo.reset()
    counters.clear()
    compiled = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=offload, dropout=0.0, compiled="aot_eager")
    assert compiled[0] == pytest.approx(eager[0], rel=1e-6)
    assert compiled[1].keys() == eager[1].keys()
    for name, grad in eager[1].items():
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-5, atol=1e-6)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert len(_debug_get_cache_entry_list(tiled_mlp._tile.__code__)) == 2  # not one a layer (the model has 2)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_inductor_tiles_on_cuda_give_the_same_gradients(tiny_model_dir: Path, tiny_tokenizer: Any, method: str) -> None:
    if method == "qlora":
        pytest.importorskip("bitsandbytes")
    eager = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=True, dropout=0.0, method=method, device="cuda")
    torch._dynamo.reset()
    compiled = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=True, dropout=0.0, compiled="inductor",
                    method=method, device="cuda")  # fmt: skip
    torch._dynamo.reset()
    assert compiled[0] == pytest.approx(eager[0], rel=1e-5)
    for name, grad in eager[1].items():  # inductor's kernels sum in other orders
        torch.testing.assert_close(compiled[1][name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))


def test_tiles_with_dropout_stay_eager(tiny_model_dir: Path, tiny_tokenizer: Any) -> None:
    """A compiled graph would draw other dropout masks in the tile's backward than in its forward."""
    from transformers import AutoModelForCausalLM

    from tunelab.backends.torch.methods import apply_method

    for dropout, compiled in ((0.0, True), (0.1, False)):
        model = apply_method(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MethodSpec("lora", dropout=dropout))
        tile_mlps(model.get_base_model(), compile_backend="aot_eager")
        assert (decoder_layers(model.get_base_model())[0].mlp.tile_compiled is not None) is compiled


def test_auto_tiles_long_checkpointed_micro_batches_only() -> None:
    def cfg(seq: int, batch: int, gc: bool, tiled: object = "auto") -> Any:
        train = {"batch_size": batch, "gradient_checkpointing": gc, "tiled_mlp": tiled}
        return load_config({"model": {"path": "m"}, "data": {"train": "d", "max_seq_len": seq}, "train": train})

    assert cfg(16384, 1, True).tiles_mlp and cfg(8192, 2, True).tiles_mlp
    assert not cfg(16384, 1, False).tiles_mlp and not cfg(4096, 2, True).tiles_mlp
    assert cfg(512, 1, False, True).tiles_mlp and not cfg(65536, 1, True, False).tiles_mlp


@pytest.mark.parametrize("compiled", [None, "aot_eager"])
def test_4_bit_weights_dequantized_once_a_call_give_the_same_gradients_with_fewer_dequantizations(
    tiny_model_dir: Path, tiny_tokenizer: Any, compiled: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """QLoRA under tiles: each of the MLP's 4-bit weights dequantized once per tiled call, not per tile and pass."""
    bnbf = pytest.importorskip("bitsandbytes.functional")
    from tunelab.backends.torch import tiled_mlp

    real = bnbf.dequantize_4bit
    runs = {}
    for once in (False, True):
        monkeypatch.setattr(tiled_mlp, "DEQUANTIZE_ONCE", once)
        calls = [0]

        def counted(*args: Any, _calls: list = calls, **kwargs: Any) -> Any:
            _calls[0] += 1
            return real(*args, **kwargs)

        monkeypatch.setattr(bnbf, "dequantize_4bit", counted)
        torch._dynamo.reset()
        loss, grads, _ = _run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=True, dropout=0.0,
                              compiled=compiled, method="qlora")  # fmt: skip
        runs[once] = loss, grads, calls[0]
    torch._dynamo.reset()
    (loss, grads, many), (once_loss, once_grads, few) = runs[False], runs[True]
    assert once_loss == pytest.approx(loss, rel=1e-6)
    assert once_grads.keys() == grads.keys() and any("mlp" in n for n in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(once_grads[name], grad, rtol=1e-5, atol=1e-6)
    assert few < many, (few, many)  # bitsandbytes' backward calls it (a tiny model's step: 44 before, 20 after)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_cuda_inductor_tiles_with_4_bit_weights_dequantized_once_give_the_same_gradients(
    tiny_model_dir: Path, tiny_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("bitsandbytes")
    from tunelab.backends.torch import tiled_mlp

    runs = []
    for once in (False, True):
        monkeypatch.setattr(tiled_mlp, "DEQUANTIZE_ONCE", once)
        torch._dynamo.reset()
        runs.append(_run(tiny_model_dir, tiny_tokenizer, tiled=True, offload=True, dropout=0.0, compiled="inductor",
                         method="qlora", device="cuda"))  # fmt: skip
    torch._dynamo.reset()
    (loss, grads, _), (once_loss, once_grads, _) = runs
    assert float(once_loss) == pytest.approx(float(loss), rel=1e-5)
    for name, grad in grads.items():  # the same products; inductor may sum the tiles' adapters in another order
        torch.testing.assert_close(once_grads[name], grad, rtol=1e-4, atol=1e-4 * float(grad.abs().max()))
