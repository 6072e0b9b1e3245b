"""FrozenBatchNorm1d/2d/3d: BN's eval map as buffers, same in train and eval, BN's state_dict."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from batchnorm import reference
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNorm3d
from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

FROZEN = {1: FrozenBatchNorm1d, 2: FrozenBatchNorm2d, 3: FrozenBatchNorm3d}
TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
OUR_BN = {1: BatchNorm1d, 2: BatchNorm2d, 3: BatchNorm3d}
SHAPES = {1: (6, 5, 7), 2: (4, 5, 3, 3), 3: (2, 5, 3, 2, 2)}
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def trained_bn(cls: type[nn.Module], dtype: torch.dtype, affine: bool = True, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = cls(5, eps=1e-3, affine=affine, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(5, generator=g, dtype=dtype))
        bn.running_var.copy_(torch.rand(5, generator=g, dtype=dtype) + 0.5)
        bn.num_batches_tracked.fill_(7)
        if affine:
            bn.weight.copy_(torch.randn(5, generator=g, dtype=dtype))
            bn.bias.copy_(torch.randn(5, generator=g, dtype=dtype))
    return bn.eval()


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("source", ["torch", "batchnorm"])
@pytest.mark.parametrize("affine", [True, False])
def test_matches_bn_eval_and_reference_in_both_modes(dim, dtype, source, affine):
    bn = trained_bn((TORCH_BN if source == "torch" else OUR_BN)[dim], dtype, affine)
    frozen = FROZEN[dim].from_batchnorm(bn)
    x = torch.randn(SHAPES[dim], dtype=dtype, generator=torch.Generator().manual_seed(1)) * 3 + 1
    expected = reference.forward_inference(
        x.numpy(),
        None if not affine else bn.weight.detach().numpy(),
        None if not affine else bn.bias.detach().numpy(),
        bn.running_mean.numpy(),
        bn.running_var.numpy(),
        eps=1e-3,
    )
    for mode in (True, False):
        frozen.train(mode)
        torch.testing.assert_close(frozen(x), torch.from_numpy(expected), **TOL[dtype])
    torch.testing.assert_close(frozen(x), bn(x), **TOL[dtype])
    assert frozen.running_mean.dtype == dtype and list(frozen.parameters()) == []


def test_buffers_are_copies_and_gradient_reaches_the_input():
    bn = trained_bn(nn.BatchNorm2d, torch.float32)
    frozen = FrozenBatchNorm2d.from_batchnorm(bn).train()
    with torch.no_grad():
        bn.running_mean.add_(10.0)
    assert not torch.equal(frozen.running_mean, bn.running_mean)
    x = torch.randn(2, 5, 3, 3, requires_grad=True)
    frozen(x).sum().backward()
    scale, _ = frozen.scale_shift()
    torch.testing.assert_close(x.grad, scale.reshape(1, -1, 1, 1).expand_as(x))
    assert frozen.running_mean.grad is None and not frozen.weight.requires_grad


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_state_dict_moves_both_ways(dim):
    bn = trained_bn(TORCH_BN[dim], torch.float32)
    frozen = FROZEN[dim](5, eps=1e-3)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked accepted and ignored
    assert set(frozen.state_dict()) == set(bn.state_dict()) - {"num_batches_tracked"}
    x = torch.randn(SHAPES[dim])
    torch.testing.assert_close(frozen(x), bn(x))

    fresh = TORCH_BN[dim](5, eps=1e-3).eval()
    fresh.load_state_dict(frozen.state_dict())  # strict: torch fills num_batches_tracked
    torch.testing.assert_close(fresh(x), bn(x))
    assert int(fresh.num_batches_tracked) == 0


def test_loads_inside_a_model_checkpoint():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), trained_bn(nn.BatchNorm2d, torch.float32)).eval()
    frozen_model = nn.Sequential(nn.Conv2d(3, 5, 1), FrozenBatchNorm2d(5, eps=1e-3))
    frozen_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(frozen_model(x), model(x))


@pytest.mark.parametrize(
    ("cls", "shape", "match"),
    [
        (FrozenBatchNorm2d, (2, 5, 3), "4-D"),
        (FrozenBatchNorm1d, (2, 5, 3, 3), "2-D"),
        (FrozenBatchNorm3d, (2, 5, 3, 3), "5-D"),
        (FrozenBatchNorm2d, (2, 4, 3, 3), "channels"),
    ],
)
def test_input_errors(cls, shape, match):
    with pytest.raises(ValueError, match=match):
        cls(5)(torch.randn(shape))


def test_constructor_errors():
    with pytest.raises(ValueError, match="num_features"):
        FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match="eps"):
        FrozenBatchNorm2d(3, eps=0.0)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchNorm2d.from_batchnorm(nn.BatchNorm2d(3, track_running_stats=False))


def test_repr():
    assert repr(FrozenBatchNorm2d(8, eps=1e-3)) == "FrozenBatchNorm2d(8, eps=0.001)"


def test_large_offset_keeps_float32_accuracy():
    """mean 1e4, std 1e-2: the folded form x * scale + shift would be off by ~0.06."""
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(8, 3, 5, 5, generator=gen)).float()
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.running_mean.copy_(x.double().mean(dim=(0, 2, 3)).float())
        bn.running_var.copy_(x.double().var(dim=(0, 2, 3)).float())
    frozen = FrozenBatchNorm2d.from_batchnorm(bn)
    expected = reference.forward_inference(
        x.double().numpy(), None, None, bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    )
    assert np.abs(frozen(x).double().numpy() - expected).max() < 1e-3
