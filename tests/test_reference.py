"""The reference against torch.nn in float64, and against its own chain rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from batchnorm import reference

SHAPES = [(8, 3), (4, 5, 7), (2, 3, 4, 5), (2, 2, 3, 4, 2)]
TORCH_BN = {
    2: torch.nn.BatchNorm1d,
    3: torch.nn.BatchNorm1d,
    4: torch.nn.BatchNorm2d,
    5: torch.nn.BatchNorm3d,
}


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
def test_matches_torch_float64(shape, momentum, rng):
    x = rng.normal(2.0, 3.0, size=shape)
    dy = rng.normal(size=shape)
    channels = shape[1]
    gamma, beta = rng.normal(size=channels), rng.normal(size=channels)
    bn = TORCH_BN[len(shape)](channels, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.from_numpy(gamma))
        bn.bias.copy_(torch.from_numpy(beta))
    xt = torch.from_numpy(x).requires_grad_()
    yt = bn(xt)
    yt.backward(torch.from_numpy(dy))

    y, cache = reference.forward(x, gamma, beta, eps=bn.eps)
    dx, dgamma, dbeta = reference.backward(dy, cache)
    count = x.size // channels
    factor = reference.momentum_factor(momentum, 1)
    running_mean, running_var = reference.update_running(
        np.zeros(channels), np.ones(channels), cache.mean, cache.var, count, factor
    )
    np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dgamma, bn.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dbeta, bn.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(running_mean, bn.running_mean.numpy(), rtol=1e-12)
    np.testing.assert_allclose(running_var, bn.running_var.numpy(), rtol=1e-12)

    bn.eval()
    y_eval = reference.forward_inference(x, gamma, beta, running_mean, running_var, eps=bn.eps)
    np.testing.assert_allclose(y_eval, bn(torch.from_numpy(x)).detach().numpy(), rtol=1e-12, atol=1e-12)


def test_cumulative_average_is_mean_of_batches(rng):
    means = [rng.normal(size=3) for _ in range(4)]
    running = np.zeros(3)
    for k, mean in enumerate(means, start=1):
        running, _ = reference.update_running(
            running, np.ones(3), mean, np.ones(3), 10, reference.momentum_factor(None, k)
        )
    np.testing.assert_allclose(running, np.mean(means, axis=0), rtol=1e-12)


@given(
    x=hnp.arrays(
        np.float64,
        hnp.array_shapes(min_dims=2, max_dims=4, min_side=2, max_side=5),
        elements=st.floats(-1e3, 1e3),
    )
)
def test_chain_rule_equals_compact_backward(x):
    rng = np.random.default_rng(1)
    gamma = rng.normal(size=x.shape[1])
    dy = rng.normal(size=x.shape)
    _, cache = reference.forward(x, gamma, None)
    long_forms, compacts = reference.backward(dy, cache), reference.backward_compact(dy, cache)
    for long_form, compact in zip(long_forms, compacts, strict=True):
        np.testing.assert_allclose(long_form, compact, rtol=1e-6, atol=1e-6 * np.abs(compact).max() + 1e-9)


def test_constant_channel_is_finite(rng):
    x = np.full((6, 2, 3), 7.0)
    y, cache = reference.forward(x, np.ones(2), np.zeros(2))
    dx, dgamma, dbeta = reference.backward(rng.normal(size=x.shape), cache)
    assert np.all(y == 0.0)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma)) and np.all(np.isfinite(dbeta))


def test_rejects_1d_input():
    with pytest.raises(ValueError, match=r"x: expected shape \(N, C\)"):
        reference.forward(np.zeros(4), None, None)
