"""Each objective in tunelab.vocab has one loss function on each backend; the loop and protocol never change."""

from __future__ import annotations

import numpy as np
import pytest

from tunelab.backends.base import ObjectiveSpec
from tunelab.errors import ConfigError
from tunelab.vocab import IGNORE, OBJECTIVES


def test_every_objective_has_a_torch_and_an_mlx_loss() -> None:
    from tunelab.backends.mlx import objectives as mlx_objectives
    from tunelab.backends.torch import objectives as torch_objectives

    for name in OBJECTIVES:
        assert callable(torch_objectives.loss_for(ObjectiveSpec(name)))
        assert callable(mlx_objectives.loss_for(ObjectiveSpec(name)))


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_an_objective_a_backend_lacks_is_refused_with_the_known_ones(backend: str) -> None:
    from tunelab.backends.mlx import objectives as mlx_objectives
    from tunelab.backends.torch import objectives as torch_objectives

    module = torch_objectives if backend == "torch" else mlx_objectives
    with pytest.raises(ConfigError) as err:
        module.loss_for(ObjectiveSpec("no-such-objective"))
    assert "no-such-objective" in err.value.message and "sft" in (err.value.hint or "")


def test_mlx_sft_loss_is_the_token_cross_entropy_over_supervised_positions() -> None:
    import mlx.core as mx

    from tunelab.backends.mlx.objectives import token_cross_entropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 11)).astype(np.float32)
    targets = rng.integers(0, 11, size=(2, 5))
    targets[0, :2] = IGNORE
    loss, count = token_cross_entropy(mx.array(logits), mx.array(targets))
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    keep = targets != IGNORE
    expected = -np.take_along_axis(logp, np.where(keep, targets, 0)[..., None], -1)[..., 0][keep].sum()
    assert int(count) == int(keep.sum()) == 8
    assert abs(float(loss) - expected) < 1e-4
