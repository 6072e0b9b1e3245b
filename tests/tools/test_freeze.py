"""freeze: every BN becomes FrozenBatchNorm, in place; outputs equal BN's eval mode, in both modes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.nn as bnn
from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d


def trained(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    for _ in range(3):
        model(torch.randn(6, 3, 5, 5) * 3 - 1)
    return model


def make(source: str) -> nn.Module:
    bn2, bn1 = (nn.BatchNorm2d, nn.BatchNorm1d) if source == "torch" else (bnn.BatchNorm2d, bnn.BatchNorm1d)
    return trained(
        nn.Sequential(nn.Conv2d(3, 4, 3), bn2(4), nn.ReLU(), nn.Flatten(), nn.Linear(36, 5), bn1(5))
    )


@pytest.mark.parametrize("source", ["torch", "batchnorm"])
def test_freeze_in_place_same_output_in_both_modes(source):
    model = make(source).eval()
    x = torch.randn(4, 3, 5, 5)
    with torch.no_grad():
        expected = model(x)
    n_params = len(list(model.parameters()))
    frozen = batchnorm.freeze(model)
    assert frozen is model
    assert isinstance(model[1], FrozenBatchNorm2d) and isinstance(model[5], FrozenBatchNorm1d)
    assert len(list(model.parameters())) == n_params - 4  # BN weight and bias are buffers now
    for mode in (True, False):
        model.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


def test_frozen_checkpoint_round_trip():
    model = make("torch").eval()
    state = model.state_dict()
    batchnorm.freeze(model)
    fresh = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        FrozenBatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(36, 5),
        FrozenBatchNorm1d(5),
    )
    fresh.load_state_dict(state)  # a BN checkpoint loads into the frozen model
    x = torch.randn(2, 3, 5, 5)
    torch.testing.assert_close(fresh(x), model(x))


def test_errors():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        batchnorm.freeze(model)
    assert type(model[0]) is nn.BatchNorm2d  # untouched on error
    with pytest.raises(TypeError, match="torch.nn.Module"):
        batchnorm.freeze([nn.BatchNorm2d(3)])  # type: ignore[arg-type]
    assert isinstance(batchnorm.freeze(nn.BatchNorm2d(3)), FrozenBatchNorm2d)
