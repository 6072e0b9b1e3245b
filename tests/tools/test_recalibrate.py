"""recalibrate: running statistics become the population averages over the given batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import batchnorm
import batchnorm.nn as bnn
from batchnorm.nn.frozen import FrozenBatchNorm2d
from batchnorm.tools.recalibrate import batch_stats, recalibrate

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def make(bn2d: type[nn.Module] = nn.BatchNorm2d, dtype: torch.dtype = torch.float64, **kw) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3), bn2d(4, **kw), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 5, 1), bn2d(5, **kw)
    ).to(dtype)


def batches(dtype: torch.dtype = torch.float64, count: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    # unequal scales per batch so the average of batch statistics differs from any single batch
    return [(torch.randn(4, 3, 5, 5, generator=g) * (1 + k) + k).to(dtype) for k in range(count)]


def population_stats(model: nn.Sequential, data: list[torch.Tensor]):
    """Mean of batch means and of batch unbiased variances of each BN input, written out by hand:
    the BN layers normalize with batch statistics (training), dropout is off (eval)."""
    first, second = [], []
    with torch.no_grad():
        for x in data:
            z1 = model[0](x)
            first.append((z1.mean(dim=(0, 2, 3)), z1.var(dim=(0, 2, 3), unbiased=True)))
            h = F.relu(F.batch_norm(z1, None, None, model[1].weight, model[1].bias, True, 0.0, model[1].eps))
            z2 = model[4](h)
            second.append((z2.mean(dim=(0, 2, 3)), z2.var(dim=(0, 2, 3), unbiased=True)))
    average = lambda pairs, i: torch.stack([p[i] for p in pairs]).mean(dim=0)  # noqa: E731
    return [(average(first, 0), average(first, 1)), (average(second, 0), average(second, 1))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bn2d", [nn.BatchNorm2d, bnn.BatchNorm2d], ids=["torch", "batchnorm"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_population_statistics(dtype, bn2d, momentum):
    model = make(bn2d, dtype, momentum=momentum).train()
    model[1].num_batches_tracked.fill_(11)
    data = batches(dtype)
    expected = population_stats(model, data)
    dropout_flags = model[3].training
    out = recalibrate(model, data, num_batches=200)
    assert out is model
    for bn, (mean, var) in zip((model[1], model[5]), expected, strict=True):
        torch.testing.assert_close(bn.running_mean, mean, **TOL[dtype])
        torch.testing.assert_close(bn.running_var, var, **TOL[dtype])
        assert bn.momentum == momentum and bn.training
    assert int(model[1].num_batches_tracked) == 11 and model[3].training == dropout_flags


def test_equal_batches_give_the_exact_data_mean():
    model = make()
    data = batches()
    recalibrate(model, data)
    all_inputs = torch.cat([model[0](x) for x in data]).detach()
    torch.testing.assert_close(model[1].running_mean, all_inputs.mean(dim=(0, 2, 3)), **TOL[torch.float64])


def test_num_batches_tuples_generators_and_eval_flag():
    model = make().eval()
    data = batches(count=6)
    expected = population_stats(model, data[:3])
    labelled = ((x, torch.zeros(len(x))) for x in data)  # a generator of (input, label) tuples
    recalibrate(model, labelled, num_batches=3, progress=False)
    torch.testing.assert_close(model[5].running_var, expected[1][1], **TOL[torch.float64])
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize(
    "bn2d",
    [lambda c: bnn.GhostBatchNorm2d(c, virtual_batch_size=2), bnn.BatchRenorm2d],
    ids=["ghost", "renorm"],
)
def test_variants_first_layer_and_buffers(bn2d):
    model = make(bn2d, torch.float64).eval()
    renorm_step = getattr(model[1], "renorm_step", None)
    before = None if renorm_step is None else renorm_step.clone()
    data = batches()
    expected = population_stats(make(dtype=torch.float64), data)  # same weights (seeded)
    recalibrate(model, data, progress=True)
    torch.testing.assert_close(model[1].running_mean, expected[0][0], **TOL[torch.float64])
    torch.testing.assert_close(model[1].running_var, expected[0][1], **TOL[torch.float64])
    if before is not None:
        assert torch.equal(model[1].renorm_step, before)


def test_frozen_and_untracked_layers_are_left_alone():
    frozen = FrozenBatchNorm2d(4).double()
    untracked = nn.BatchNorm2d(5, track_running_stats=False).double()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), frozen, nn.Conv2d(4, 5, 1), untracked).double()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert recalibrate(model, batches()) is model
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_batch_stats_formula():
    x = torch.randn(3, 2, 4, dtype=torch.float64)
    mean, var, m = batch_stats(x)
    flat = x.transpose(0, 1).reshape(2, -1)
    assert m == 12
    torch.testing.assert_close(var, flat.var(dim=1, unbiased=True), rtol=1e-12, atol=0)
    torch.testing.assert_close(mean, flat.mean(dim=1), rtol=1e-12, atol=0)


def test_errors_restore_state():
    model = make().train()
    with pytest.raises(ValueError, match="num_batches"):
        recalibrate(model, batches(), num_batches=0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TypeError, match="first item is"):
        recalibrate(model, [batches()[0], "not a tensor"])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules()) and model[1].momentum == 0.1
    assert batchnorm.recalibrate is recalibrate
