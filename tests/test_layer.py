"""``batchnorm.BatchNorm``, the NumPy layer, against ``batchnorm.reference``."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import batchnorm
from batchnorm import reference

SHAPES = [(16, 4), (5, 3, 7), (4, 3, 5, 6)]


def running_reference(batches, momentum, count):
    """Running estimates after ``batches``, straight from the reference's update rule."""
    mean, var = np.zeros(batches[0].shape[1]), np.ones(batches[0].shape[1])
    for k, x in enumerate(batches, start=1):
        _, cache = reference.forward(x.astype(np.float64), None, None)
        factor = reference.momentum_factor(momentum, k)
        mean, var = reference.update_running(mean, var, cache.mean, cache.var, count, factor)
    return mean, var


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-10), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape", SHAPES)
def test_training_steps_match_reference(rng, shape, dtype, rtol, momentum):
    bn = batchnorm.BatchNorm(shape[1], momentum=momentum)
    bn.gamma = rng.normal(1.0, 0.3, shape[1])
    bn.beta = rng.normal(0.0, 1.0, shape[1])
    batches = [rng.normal(k, 1.0 + k, shape).astype(dtype) for k in range(3)]
    for x in batches:
        y = bn.forward(x)
    x = batches[-1].astype(np.float64)
    y_ref, cache = reference.forward(x, bn.gamma, bn.beta)
    assert y.dtype == dtype
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=rtol * np.max(np.abs(y_ref)))

    dout = rng.normal(size=shape).astype(dtype)
    dx = bn.backward(dout)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dout.astype(np.float64), cache)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=rtol * np.max(np.abs(dx_ref)))
    np.testing.assert_allclose(bn.dgamma, dgamma_ref, rtol=0, atol=rtol * np.max(np.abs(dbeta_ref)) * 10)
    np.testing.assert_allclose(bn.dbeta, dbeta_ref, rtol=0, atol=rtol * np.max(np.abs(dbeta_ref)) * 10)

    count = x.size // shape[1]
    mean_ref, var_ref = running_reference(batches, momentum, count)
    assert bn.num_batches_tracked == 3
    np.testing.assert_allclose(bn.running_mean, mean_ref, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(bn.running_var, var_ref, rtol=rtol)


def test_cumulative_average_is_the_plain_mean_of_batch_statistics(rng):
    bn = batchnorm.BatchNorm(3, momentum=None)
    batches = [rng.normal(k, 2.0, (10, 3)) for k in range(4)]
    for x in batches:
        bn.forward(x)
    np.testing.assert_allclose(
        bn.running_mean, np.mean([x.mean(axis=0) for x in batches], axis=0), rtol=1e-12
    )
    np.testing.assert_allclose(bn.running_var, np.mean([x.var(axis=0, ddof=1) for x in batches], axis=0))


@pytest.mark.parametrize("shape", SHAPES)
def test_eval_forward_and_backward_use_running_statistics(rng, shape):
    bn = batchnorm.BatchNorm(shape[1])
    bn.running_mean = rng.normal(size=shape[1])
    bn.running_var = rng.uniform(0.5, 2.0, shape[1])
    bn.gamma, bn.beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    x = rng.normal(size=shape)
    mean_before, var_before = bn.running_mean.copy(), bn.running_var.copy()
    y = bn.forward(x, training=False)
    y_ref = reference.forward_inference(x, bn.gamma, bn.beta, bn.running_mean, bn.running_var)
    np.testing.assert_allclose(y, y_ref, rtol=1e-12, atol=1e-12)
    assert bn.num_batches_tracked == 0
    assert np.array_equal(bn.running_mean, mean_before) and np.array_equal(bn.running_var, var_before)

    dout = rng.normal(size=shape)
    dx = bn.backward(dout)
    invstd = reference._per_channel(1.0 / np.sqrt(bn.running_var + bn.eps), x.ndim)
    x_hat = (x - reference._per_channel(bn.running_mean, x.ndim)) * invstd
    axes = reference.reduction_axes(x)
    np.testing.assert_allclose(dx, dout * reference._per_channel(bn.gamma, x.ndim) * invstd, rtol=1e-12)
    np.testing.assert_allclose(bn.dgamma, (dout * x_hat).sum(axis=axes), rtol=1e-10)
    np.testing.assert_allclose(bn.dbeta, dout.sum(axis=axes), rtol=1e-10)


def test_gradient_matches_finite_differences(rng):
    # loss = sum(weights * y); a fresh layer per probe so running stats do not matter.
    bn = batchnorm.BatchNorm(2)
    bn.gamma = np.array([1.5, -0.7])
    x = rng.normal(size=(3, 2, 2))
    weights = rng.normal(size=x.shape)
    bn.forward(x)
    dx = bn.backward(weights)
    h = 1e-6
    for index in [(0, 0, 0), (2, 1, 1), (1, 0, 1)]:
        xp, xm = x.copy(), x.copy()
        xp[index] += h
        xm[index] -= h
        probe = batchnorm.BatchNorm(2)
        probe.gamma = bn.gamma
        numeric = (np.sum(weights * probe.forward(xp)) - np.sum(weights * probe.forward(xm))) / (2 * h)
        assert dx[index] == pytest.approx(numeric, rel=1e-5, abs=1e-7)


def test_empty_batch_returns_empty_and_changes_nothing():
    bn = batchnorm.BatchNorm(3)
    y = bn.forward(np.zeros((0, 3, 4)))
    assert y.shape == (0, 3, 4) and bn.num_batches_tracked == 0
    assert np.array_equal(bn.running_mean, np.zeros(3)) and np.array_equal(bn.running_var, np.ones(3))


@pytest.mark.parametrize(
    "x, error, match",
    [
        (np.ones(3), ValueError, r"x must be \(N, C\) or \(N, C, \*spatial\), got 1-D"),
        (np.ones((4, 5)), ValueError, "num_features=3 channels on axis 1, got shape"),
        (np.ones((4, 3), np.int64), TypeError, "x must be a floating-point array, got dtype int64"),
        (np.ones((1, 3)), ValueError, "more than 1 value per channel.*drop_last"),
        (np.ones((1, 3, 1, 1)), ValueError, "more than 1 value per channel"),
    ],
)
def test_bad_input_raises_and_leaves_state_untouched(rng, x, error, match):
    bn = batchnorm.BatchNorm(3)
    bn.forward(rng.normal(size=(8, 3)))
    state = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked, bn._saved
    with pytest.raises(error, match=match):
        bn.forward(x)
    assert np.array_equal(state[0], bn.running_mean) and np.array_equal(state[1], bn.running_var)
    assert state[2] == bn.num_batches_tracked and state[3] is bn._saved


def test_eps_and_constructor_arguments_are_checked(rng):
    for kwargs, match in [
        ({"eps": 0.0}, "eps must be > 0"),
        ({"eps": -1e-5}, "eps must be > 0"),
        ({"momentum": 1.5}, "momentum must be in"),
    ]:
        with pytest.raises(ValueError, match=match):
            batchnorm.BatchNorm(3, **kwargs)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_features must be a positive int"):
            batchnorm.BatchNorm(bad)
    bn = batchnorm.BatchNorm(3)
    bn.eps = 0.0
    with pytest.raises(ValueError, match="eps must be > 0"):
        bn.forward(rng.normal(size=(4, 3)))
    assert bn.num_batches_tracked == 0


def test_backward_needs_a_forward_of_the_same_shape(rng):
    bn = batchnorm.BatchNorm(3)
    with pytest.raises(ValueError, match="call forward"):
        bn.backward(np.ones((4, 3)))
    bn.forward(rng.normal(size=(4, 3)))
    with pytest.raises(ValueError, match=r"dout must have the last forward input's shape \(4, 3\)"):
        bn.backward(np.ones((5, 3)))


def test_layer_works_with_torch_blocked():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, batchnorm\n"
        "bn = batchnorm.BatchNorm(2)\n"
        "y = bn.forward(np.arange(12.0).reshape(3, 2, 2))\n"
        "dx = bn.backward(np.ones_like(y))\n"
        "assert abs(y.mean()) < 1e-12 and abs(dx).max() < 1e-9\n"
        "assert 'torch' not in [m.split('.')[0] for m in sys.modules if sys.modules[m] is not None]\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


@pytest.mark.parametrize("shape", [(256, 8), (16, 4, 7, 7)])
def test_float32_gradients_keep_their_accuracy_at_a_large_offset(rng, shape):
    """mean 1e4, std 1e-2: the backward forms x_hat from the forward's float64 mean (a
    float32-rounded one put dgamma off by ~5e-2 of its largest value), as the reference does."""
    bn = batchnorm.BatchNorm(shape[1], dtype=np.float32)
    bn.gamma = rng.uniform(0.5, 1.5, shape[1]).astype(np.float32)
    x = rng.normal(1e4, 1e-2, shape).astype(np.float32)
    dout = rng.normal(size=shape).astype(np.float32)
    bn.forward(x)
    dx = bn.backward(dout)
    _, cache = reference.forward(x.astype(np.float64), bn.gamma.astype(np.float64), None)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dout.astype(np.float64), cache)
    for got, want in ((dx, dx_ref), (bn.dgamma, dgamma_ref), (bn.dbeta, dbeta_ref)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.max(np.abs(want)))
