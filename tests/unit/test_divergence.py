"""Divergence stops meta-training with a message naming the inner-loop settings (gmeta.meta.module)."""

from __future__ import annotations

import math

import pytest
import torch

from gmeta.errors import UserError
from gmeta.meta.config import MetaConfig
from gmeta.meta.module import EXPLODED_LOSS, DivergenceError, check_divergence

CFG = MetaConfig("maml", inner_lr=0.3, inner_steps=3)
IDS = ["u1/warm", "u2/user_cold"]


def _stats(support: float, query: float) -> dict[str, torch.Tensor]:
    return {"support_loss": torch.tensor(support), "query_loss": torch.tensor(query)}


@pytest.mark.parametrize("loss", [0.0, 0.69, EXPLODED_LOSS])
def test_healthy_losses_pass(loss: float) -> None:
    # a NaN support loss is legitimate: no inner loop ran (meta=none, or no support rows)
    check_divergence(torch.tensor(loss), _stats(math.nan, loss), 7, CFG, IDS)


@pytest.mark.parametrize("loss", [math.nan, math.inf, EXPLODED_LOSS * 1.01, 3e7])
def test_non_finite_or_exploded_loss_names_the_inner_lr(loss: float) -> None:
    with pytest.raises(DivergenceError) as info:
        check_divergence(torch.tensor(loss), _stats(0.7, loss), 12, CFG, IDS)
    message = str(info.value)
    assert isinstance(info.value, UserError)  # exit status 2 with this one message, no traceback
    assert "diverged at step 12" in message
    assert "meta.inner_lr=0.3, meta.inner_steps=3 (maml)" in message
    assert "e.g. meta.inner_lr=0.075" in message
    assert "support loss 0.7" in message and "u2/user_cold" in message
