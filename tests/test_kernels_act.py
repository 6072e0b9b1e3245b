"""The fused BN + activation kernels against the NumPy reference, every layout x dtype x split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import reference
from batchnorm.kernels import _act_dispatch as dispatch

SLOPE = 0.1


def act_ref(z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return np.maximum(z, 0.0)
    if act == "leaky_relu":
        return np.where(z > 0, z, z * SLOPE)
    if act == "silu":
        return z / (1.0 + np.exp(-z))
    return z


def act_grad_ref(z: np.ndarray, act: str) -> np.ndarray:
    if act == "relu":
        return (z > 0).astype(z.dtype)
    if act == "leaky_relu":
        return np.where(z > 0, 1.0, SLOPE)
    if act == "silu":
        s = 1.0 / (1.0 + np.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    return np.ones_like(z)


def layout(x: np.ndarray, name: str) -> np.ndarray:
    """The same values in another memory layout."""
    if name == "channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    if name == "strided":  # every other element of a larger buffer: no canonical view exists
        big = np.zeros(x.shape[:-1] + (2 * x.shape[-1],), x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return np.ascontiguousarray(x)


# (shape, layout): NCS rows, (N, C), channels-last, S == 1 and non-canonical strides.
CASES = [
    ((4, 3, 5, 6), "contiguous"),
    ((4, 3, 5, 6), "channels_last"),
    ((6, 5, 7), "contiguous"),
    ((37, 9), "contiguous"),
    ((3, 4, 1, 1), "contiguous"),
    ((3, 4, 5, 2), "strided"),
    # 5 channels do not split evenly over 2 threads (the unfused (N, C, S) kernels), and the
    # second thread's 15 // 2 = 7 rows start at n = 1, channel 2
    ((3, 5, 4, 2), "contiguous"),
    # a short map read as 64 rows of C * S (``_run``; the forward too with tiny blocks):
    # 3 channels of 6 columns each
    ((64, 3, 2, 3), "contiguous"),
]
TOL = {np.float64: 1e-10, np.float32: 2e-5}


def make(shape, dtype, name, rng, offset=0.0):
    x = layout((rng.normal(offset, 2.0, shape)).astype(dtype), name)
    gamma = rng.normal(1.0, 0.5, shape[1]).astype(dtype)
    beta = rng.normal(0.0, 0.5, shape[1]).astype(dtype)
    dy = rng.normal(size=shape).astype(dtype)
    return x, gamma, beta, dy


def expected(x, gamma, beta, dy, act):
    """Reference in float64: y, stats and the gradient through act'(z)."""
    x64 = x.astype(np.float64)
    z, cache = reference.forward(x64, gamma.astype(np.float64), beta.astype(np.float64))
    dz = dy.astype(np.float64) * act_grad_ref(z, act)
    dx, dgamma, dbeta = reference.backward_compact(dz, cache)
    return act_ref(z, act), cache, dx, dgamma, dbeta


def close(got, want, dtype):
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=TOL[dtype] * scale)


@pytest.fixture(params=["serial", "parallel-tiny-blocks"])
def block_bytes(request, monkeypatch):
    """The single-threaded twins (small inputs), and the parallel kernels with many small
    row blocks per thread, so every split and combine path runs on test-sized inputs."""
    from batchnorm.kernels import _dispatch

    monkeypatch.setattr(_dispatch, "_MIN_RUN_BYTES", 0)  # test-sized runs may take the fused backward
    if request.param != "serial":
        monkeypatch.setattr(dispatch, "_BLOCK_BYTES", 64)
        monkeypatch.setattr(_dispatch, "_PARALLEL_MIN", 1)
        monkeypatch.setattr(dispatch, "_RUN_FORWARD_MIN", 0)  # short maps' forward as rows too
    return request.param


@pytest.mark.parametrize("act", list(dispatch.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,name", CASES)
def test_forward_backward_match_reference(shape, name, dtype, act, rng, block_bytes):
    x, gamma, beta, dy = make(shape, dtype, name, rng)
    y_ref, cache, dx_ref, dgamma_ref, dbeta_ref = expected(x, gamma, beta, dy, act)
    y, mean, var, invstd = dispatch.forward_train(x, gamma, beta, 1e-5, act, SLOPE)
    assert y.dtype == dtype and mean.dtype == dtype and y.shape == x.shape
    if name != "strided":
        assert y.strides == x.strides  # channels-last stays channels-last
    close(y, y_ref, dtype)
    close(mean, cache.mean, dtype)
    close(var, cache.var, dtype)
    from_output = [False, True] if act in dispatch.INVERTIBLE else [False]
    for saved_output in from_output:
        saved = y if saved_output else x
        dx, dgamma, dbeta = dispatch.backward(dy, saved, mean, invstd, gamma, beta, act, SLOPE, saved_output)
        assert dx.dtype == dtype and dx.strides == y.strides
        # Recovering x_hat from a float32 y costs a few ulps of |z| / |gamma|.
        tol = 10 if saved_output and dtype == np.float32 else 1
        np.testing.assert_allclose(dx, dx_ref, atol=tol * TOL[dtype] * max(1, np.abs(dx_ref).max()))
        close(dgamma, dgamma_ref, dtype)
        close(dbeta, dbeta_ref, dtype)


@pytest.mark.parametrize("act", list(dispatch.ACTIVATIONS))
@pytest.mark.parametrize(
    "shape,name",
    [
        ((5, 4, 3, 3), "contiguous"),  # the fused (N, C, S) kernel, statistics given
        ((3, 5, 4, 2), "contiguous"),  # on 2 threads: normalize_act_ncs, 5 channels unsplit
        ((5, 4, 3, 3), "channels_last"),
        ((20, 3, 2, 3), "contiguous"),  # a short map as rows of C * S, its vectors repeated
    ],
)
def test_inference_matches_reference(shape, name, act, rng, block_bytes):
    x, gamma, beta, _ = make(shape, np.float64, name, rng)
    running_mean, running_var = rng.normal(size=shape[1]), rng.uniform(0.5, 2.0, shape[1])
    y = dispatch.forward_inference(x, gamma, beta, running_mean, running_var, 1e-5, act, SLOPE)
    z = reference.forward_inference(x, gamma, beta, running_mean, running_var, 1e-5)
    close(y, act_ref(z, act), np.float64)


@pytest.mark.parametrize("act", list(dispatch.ACTIVATIONS))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape", [(64, 16), (1024, 96)])
def test_small_rows_inference_shortcut_is_the_general_path_bit_for_bit(act, dtype, affine, shape, rng):
    # A small C-contiguous (N, C) input, or a larger one of >= 64 channels, with (C,) vectors
    # of its dtype takes the one-call kernel (normalize_act_running_rows); lists for
    # gamma/beta take the general path (parallel for (1024, 96)).
    c = shape[1]
    x = (rng.normal(size=shape) * 3 + 2).astype(dtype)
    running_mean = rng.normal(size=c).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, c).astype(dtype)
    gamma, beta = rng.normal(size=(2, c)).astype(dtype) if affine else (None, None)
    fast = dispatch.forward_inference(x, gamma, beta, running_mean, running_var, 1e-5, act, SLOPE)
    as_lists = (list(gamma), list(beta)) if affine else ([1.0] * c, [0.0] * c)
    general = dispatch.forward_inference(x, *as_lists, running_mean, running_var, 1e-5, act, SLOPE)
    assert fast.dtype == x.dtype
    np.testing.assert_array_equal(fast, general)
    z = reference.forward_inference(x.astype(np.float64), gamma, beta, running_mean, running_var, 1e-5)
    close(fast, act_ref(z, act), dtype)
    with pytest.raises(ValueError, match="act: expected one of"):
        dispatch.forward_inference(x, gamma, beta, running_mean, running_var, 1e-5, "tanh", SLOPE)


def test_affine_none_means_gamma_one_beta_zero(rng):
    x = rng.normal(size=(8, 3, 4))
    y, *_ = dispatch.forward_train(x, None, None, 1e-5, "identity")
    y_ref, _ = reference.forward(x, None, None)
    close(y, y_ref, np.float64)


@pytest.mark.parametrize(
    "shape,name",
    [((16, 3, 32, 32), "contiguous"), ((512, 8), "contiguous"), ((8, 3, 16, 16), "channels_last")],
)
def test_float32_large_offset_keeps_its_digits(shape, name, rng):
    """Mean 1e4, std 1: E[x^2] - E[x]^2 in float32 would lose every digit of the variance."""
    x, gamma, beta, _ = make(shape, np.float32, name, rng, offset=1e4)
    x = (x - 1e4) / 2 + np.float32(1e4)  # std 1 around 1e4, exactly representable offsets
    y, mean, var, _ = dispatch.forward_train(x, None, None, 1e-5, "identity")
    y_ref, cache = reference.forward(x.astype(np.float64), None, None)
    np.testing.assert_allclose(var, cache.var, rtol=1e-5)
    np.testing.assert_allclose(y, y_ref, atol=1e-3)  # float32 x itself carries 1e4 * 6e-8 of noise


@pytest.mark.parametrize("name", ["contiguous", "channels_last"])
def test_float32_prediction_at_large_offset_and_tiny_spread(name, rng):
    """Mean 1e4, std 1e-2: ``x * scale + (beta - mean * scale)`` would round ``x * scale``
    (~1e6) to 0.06 and lose most of y; ``(x - mean) * scale`` is exact there (Sterbenz)."""
    x = layout((1e4 + 1e-2 * rng.normal(size=(16, 6, 8, 8))).astype(np.float32), name)
    x64 = x.astype(np.float64)
    running_mean, running_var = x64.mean(axis=(0, 2, 3)), x64.var(axis=(0, 2, 3))
    gamma, beta = rng.normal(1.0, 0.5, 6), rng.normal(0.0, 0.5, 6)
    y = dispatch.forward_inference(x, gamma, beta, running_mean, running_var, 1e-5, "identity")
    y_ref = reference.forward_inference(x64, gamma, beta, running_mean, running_var, eps=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-4 * np.abs(y_ref).max())


def test_float16_is_computed_in_float32(rng):
    x = rng.normal(size=(4, 3, 8)).astype(np.float16)
    y, mean, *_ = dispatch.forward_train(x, None, None, 1e-5, "relu")
    assert y.dtype == np.float16 and mean.dtype == np.float32
    y_ref, _ = reference.forward(x.astype(np.float64), None, None)
    np.testing.assert_allclose(y.astype(np.float64), np.maximum(y_ref, 0), atol=2e-3)


@given(
    n=st.integers(2, 6),
    c=st.integers(1, 5),
    s=st.integers(1, 7),
    act=st.sampled_from(list(dispatch.ACTIVATIONS)),
    channels_last=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_property_gradient_matches_reference(n, c, s, act, channels_last, seed):
    rng = np.random.default_rng(seed)
    x, gamma, beta, dy = make(
        (n, c, s, 2), np.float64, "channels_last" if channels_last else "contiguous", rng
    )
    _, _, dx_ref, dgamma_ref, _ = expected(x, gamma, beta, dy, act)
    _, mean, _, invstd = dispatch.forward_train(x, gamma, beta, 1e-5, act, SLOPE)
    dx, dgamma, _ = dispatch.backward(dy, x, mean, invstd, gamma, beta, act, SLOPE)
    close(dx, dx_ref, np.float64)
    close(dgamma, dgamma_ref, np.float64)


def test_errors_name_the_argument(rng):
    x = rng.normal(size=(4, 3))
    with pytest.raises(ValueError, match="act: expected one of"):
        dispatch.forward_train(x, None, None, 1e-5, "gelu")
    with pytest.raises(TypeError, match="x: expected a float16, float32 or float64"):
        dispatch.forward_train(x.astype(np.int64), None, None, 1e-5, "relu")
    with pytest.raises(ValueError, match="at least one value per channel"):
        dispatch.forward_train(np.empty((0, 3)), None, None, 1e-5, "relu")
    y, mean, _, invstd = dispatch.forward_train(x, None, None, 1e-5, "relu")
    with pytest.raises(ValueError, match="from_output"):
        dispatch.backward(x, y, mean, invstd, None, None, "relu", SLOPE, True)
    with pytest.raises(ValueError, match="gamma: recovering x_hat"):
        dispatch.backward(x, y, mean, invstd, np.array([1.0, 0.0, 1.0]), None, "identity", SLOPE, True)


@pytest.mark.parametrize("from_output", [False, True])
@pytest.mark.parametrize("shape,name", CASES)
def test_split_backward_over_two_halves_equals_the_whole(shape, name, from_output, rng, block_bytes):
    """SyncBatchNormAct's use: reduce each half of the batch, add the sums, then each half's
    dx with the summed sums and the global count, equals the backward over the whole batch."""
    act = "leaky_relu"
    x, gamma, beta, dy = make(shape, np.float64, name, rng)
    y_ref, cache, dx_ref, dgamma_ref, dbeta_ref = expected(x, gamma, beta, dy, act)
    y, mean, _, invstd = dispatch.forward_train(x, gamma, beta, 1e-5, act, SLOPE)
    saved = y if from_output else x
    cut = shape[0] // 2
    halves = [(dy[:cut], saved[:cut]), (dy[cut:], saved[cut:])]
    args = (mean, invstd, gamma, beta, act, SLOPE, from_output)
    sums = [dispatch.backward_reduce_act(d, s, *args) for d, s in halves]
    sum_dz, sum_dz_xhat = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    close(sum_dz, dbeta_ref, np.float64)
    close(sum_dz_xhat, dgamma_ref, np.float64)
    count = x.size // shape[1]
    dx = np.concatenate(
        [dispatch.backward_dx_act(d, s, *args, sum_dz, sum_dz_xhat, count) for d, s in halves]
    )
    close(dx, dx_ref, np.float64)


@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last", "float32"])
def test_out_argument_is_written(out_layout, rng):
    """normalize_act and backward_dx_act write into out= (any layout; another dtype is cast)."""
    shape, act = (4, 3, 5, 2), "silu"
    x, gamma, beta, dy = make(shape, np.float64, "contiguous", rng)
    y_ref, cache, dx_ref, _, dbeta_ref = expected(x, gamma, beta, dy, act)
    dtype = np.float32 if out_layout == "float32" else np.float64
    out = layout(np.zeros(shape, dtype), "channels_last" if out_layout == "channels_last" else "contiguous")
    y = dispatch.normalize_act(x, cache.mean, cache.invstd, gamma, beta, act, SLOPE, out=out)
    assert y is out
    np.testing.assert_allclose(out, y_ref, atol=TOL[dtype] * max(1, np.abs(y_ref).max()))
    sums = dispatch.backward_reduce_act(dy, x, cache.mean, cache.invstd, gamma, beta, act, SLOPE)
    out2 = np.zeros_like(out)
    dx = dispatch.backward_dx_act(
        dy, x, cache.mean, cache.invstd, gamma, beta, act, SLOPE, False, *sums, x.size // 3, out=out2
    )
    assert dx is out2
    np.testing.assert_allclose(out2, dx_ref, atol=TOL[dtype] * max(1, np.abs(dx_ref).max()))
    with pytest.raises(ValueError, match="out: expected an array of x's shape"):
        dispatch.normalize_act(x, cache.mean, cache.invstd, gamma, beta, act, SLOPE, out=np.zeros((4, 3)))
    with pytest.raises(ValueError, match="count: expected"):
        dispatch.backward_dx_act(dy, x, cache.mean, cache.invstd, gamma, beta, act, SLOPE, False, *sums, 0)


@pytest.mark.parametrize("bad", [np.ones(5), np.ones((4, 1))])
def test_per_channel_vector_of_wrong_shape_names_the_argument(bad):
    x = np.random.default_rng(0).normal(size=(8, 4, 3))
    with pytest.raises(ValueError, match=r"gamma: expected shape \(4,\)"):
        dispatch.forward_train(x, bad, None, 1e-5, "relu", 0.01)
