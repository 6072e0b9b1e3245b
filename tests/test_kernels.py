"""The numba kernels against ``batchnorm.reference``: every layout x dtype x parallel split."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import types

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchnorm import kernels, reference
from batchnorm.kernels import _dispatch

# Relative tolerance per input dtype, against a reference computed in float64 on the same values.
# float16 outputs are rounded to float16 (unit roundoff 4.9e-4), a few roundings deep.
RTOL = {np.float64: 1e-10, np.float32: 1e-5, np.float16: 3e-3}
DTYPES = list(RTOL)
LAYOUTS = ["contiguous", "channels_last", "sliced", "fortran"]
# (2, 9, 5): 9 channels in 2 uneven channel blocks on 2 threads (the fused channels-first kernels);
# (64, 3, 2, 3): short runs read as rows of C * S (``_short_runs``), 8 of them to a row in parallel
SHAPES = [(7, 5), (4, 3, 33), (3, 6, 5, 7), (2, 3, 4, 5, 6), (1, 4, 9, 11), (2, 9, 5), (64, 3, 2, 3)]


def make(rng, shape, dtype, layout, loc=0.0, scale=1.0):
    """An array of ``shape`` with the given memory layout and values ~ N(loc, scale^2)."""
    if layout == "sliced":  # every other element along the last axis: no unit stride anywhere
        big = rng.normal(loc, scale, (*shape[:-1], 2 * shape[-1])).astype(dtype)
        return big[..., ::2]
    x = rng.normal(loc, scale, shape).astype(dtype)
    if layout == "channels_last":
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(x, 1, -1)), -1, 1)
    if layout == "fortran":
        return np.asfortranarray(x)
    return x


# Dispatch thresholds that force the blocked reductions (many small blocks, all threads).
SPLIT = {"_SLAB_BYTES": 0, "_BLOCK_BYTES": 64, "_ROW_BLOCK_BYTES": 64, "_PARALLEL_MIN": 0}


@contextlib.contextmanager
def forced_split():
    saved = {name: getattr(_dispatch, name) for name in SPLIT}
    try:
        for name, value in SPLIT.items():
            setattr(_dispatch, name, value)
        yield
    finally:
        for name, value in saved.items():
            setattr(_dispatch, name, value)


PATHS = {
    # one thread, one-call kernels (what small inputs get, or any input with one thread)
    "serial": {"_SLAB_BYTES": 1 << 40, "_MIN_RUN_BYTES": 0, "_PARALLEL_MIN": 1 << 62},
    # every thread, one-call kernels where the layout allows (what large inputs with many channels get)
    "parallel": {"_SLAB_BYTES": 1 << 40, "_MIN_RUN_BYTES": 0, "_PARALLEL_MIN": 0},
    # every thread, blocked reductions combined across blocks (few channels, huge slabs)
    "split": SPLIT,
}


@pytest.fixture(params=list(PATHS))
def path(request, monkeypatch):
    """The kernel path, forced by the dispatcher's thresholds; checks the thread counts it used."""
    for name, value in PATHS[request.param].items():
        monkeypatch.setattr(_dispatch, name, value)
    used: list[int] = []
    use_threads = _dispatch._use_threads
    monkeypatch.setattr(_dispatch, "_use_threads", lambda size: used.append(use_threads(size)) or used[-1])
    yield request.param
    if used:
        expected = 1 if request.param == "serial" else kernels.num_threads()
        assert set(used) == {expected}


def close(actual, expected, dtype, scale=None):
    """Max error relative to the value scale of ``expected`` (or ``scale``)."""
    actual = np.asarray(actual, np.float64)
    scale = np.max(np.abs(expected)) if scale is None else scale
    np.testing.assert_allclose(actual, expected, rtol=0, atol=RTOL[dtype] * max(scale, 1e-300))


def same_layout(a, b):
    """Same axis order in memory (stride ranking), the contract's "x's memory layout"."""
    return list(np.argsort(a.strides, kind="stable")) == list(np.argsort(b.strides, kind="stable"))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference(rng, shape, dtype, layout, path):
    x = make(rng, shape, dtype, layout, loc=3.0, scale=2.0)
    dy = make(rng, shape, dtype, "contiguous")
    gamma = rng.normal(1.0, 0.5, shape[1]).astype(dtype)
    beta = rng.normal(0.0, 1.0, shape[1]).astype(dtype)
    x64, g64, b64 = (a.astype(np.float64) for a in (x, gamma, beta))
    y_ref, cache = reference.forward(x64, g64, b64, eps=1e-5)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy.astype(np.float64), cache)

    y, mean, var, invstd = kernels.forward_train(x, gamma, beta, 1e-5)
    stat_dtype = np.float64 if dtype == np.float64 else np.float32
    assert y.dtype == dtype and y.shape == x.shape
    assert mean.dtype == var.dtype == invstd.dtype == stat_dtype
    if layout != "fortran" or x.ndim == 2:
        assert same_layout(y, x)
    close(y, y_ref, dtype)
    close(mean, cache.mean, dtype, scale=3.0)
    close(var, cache.var, dtype)
    close(invstd, cache.invstd, dtype)

    # The backward runs on the float64 statistics so it is tested apart from their rounding.
    dx, dgamma, dbeta = kernels.backward(dy, x, cache.mean, cache.invstd, gamma)
    assert dx.dtype == dtype and dgamma.dtype == dbeta.dtype == stat_dtype
    close(dx, dx_ref, dtype)
    close(dgamma, dgamma_ref, dtype, scale=np.max(np.abs(dbeta_ref)) + np.max(np.abs(dgamma_ref)))
    close(dbeta, dbeta_ref, dtype)

    sum_dy, sum_dy_xhat = kernels.backward_reduce(dy, x, cache.mean, cache.invstd)
    np.testing.assert_allclose(sum_dy, dbeta, rtol=RTOL[dtype], atol=RTOL[dtype])
    np.testing.assert_allclose(sum_dy_xhat, dgamma, rtol=RTOL[dtype], atol=RTOL[dtype])
    count = x.size // x.shape[1]
    dx2 = kernels.backward_dx(dy, x, cache.mean, cache.invstd, gamma, sum_dy, sum_dy_xhat, count)
    close(dx2, dx_ref, dtype)


@pytest.mark.skipif(_dispatch.numba.config.NUMBA_NUM_THREADS < 2, reason="needs a pool of 2 threads")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("shape", "seg"), [((8, 16, 32, 32), 1), ((2, 3, 64, 64), 2)])
def test_unfused_channels_first_passes_in_one_call_match_reference(rng, shape, seg, dtype, monkeypatch):
    # no fused channel blocks: statistics, vectors and output pass in one compiled call, and
    # reduction, coefficients and dx pass in another, with whole (n, c) rows over the threads'
    # ranges, or with 6 rows split in pieces for 2 threads (the backward's piece size: 2 arrays)
    monkeypatch.setattr(_dispatch, "_SLAB_BYTES", 0)
    monkeypatch.setattr(_dispatch, "_threads_override", 2)
    monkeypatch.setattr(_dispatch, "_PARALLEL_MIN", 0)
    segs = {}
    for name in ("forward_two_pass_cf", "backward_two_pass_cf"):
        kernel = getattr(_dispatch, name)

        def spy(*args, kernel=kernel, name=name):
            segs[name] = args[5 if name.startswith("forward") else 6]
            return kernel(*args)

        spy.serial = kernel.serial
        monkeypatch.setattr(_dispatch, name, spy)
    x = make(rng, shape, dtype, "contiguous", loc=50.0, scale=0.5)
    dy = make(rng, shape, dtype, "contiguous", loc=0.3)
    gamma = rng.normal(1.0, 0.5, shape[1]).astype(dtype)
    beta = rng.normal(0.0, 1.0, shape[1]).astype(dtype)
    y_ref, cache = reference.forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy.astype(np.float64), cache)
    y, mean, var, invstd = kernels.forward_train(x, gamma, beta, 1e-5, stats64=True)
    dx, dgamma, dbeta = kernels.backward(dy, x, mean, invstd, gamma)
    assert segs["backward_two_pass_cf"] == seg
    assert segs["forward_two_pass_cf"] == _dispatch._seg_cf(shape[0] * shape[1], x[0, 0].size, x.itemsize, 2)
    close(y, y_ref, dtype)
    np.testing.assert_allclose(mean, cache.mean, rtol=1e-12)
    np.testing.assert_allclose(var, cache.var, rtol=RTOL[dtype])
    np.testing.assert_allclose(invstd, cache.invstd, rtol=RTOL[dtype])
    close(dx, dx_ref, dtype)
    close(dgamma, dgamma_ref, dtype, scale=np.max(np.abs(dbeta_ref)) + np.max(np.abs(dgamma_ref)))
    close(dbeta, dbeta_ref, dtype)


# (5, 3, 4, 4): 15 rows in 2 ranges, the second starting mid-batch at channel 1;
# (40, 3, 2, 3): ``_short_runs``
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (5, 3, 4, 4), (40, 3, 2, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_normalize_and_stats_match_reference(rng, shape, dtype, layout, path):
    x = make(rng, shape, dtype, layout, loc=-2.0, scale=3.0)
    # a contiguous input of the second shape is normalized as rows (channels-last ones always are)
    canonical = np.empty((shape[0], shape[1], shape[2] * shape[3]), dtype)
    assert _dispatch._short_runs(canonical) == (shape == (40, 3, 2, 3))
    x64 = x.astype(np.float64)
    mean, var = kernels.channel_stats(x)
    _, cache = reference.forward(x64, None, None)
    close(mean, cache.mean, dtype, scale=2.0)
    close(var, cache.var, dtype)

    c = shape[1]
    running_mean, running_var = rng.normal(size=c), rng.uniform(0.5, 2.0, c)
    gamma, beta = rng.normal(size=c), rng.normal(size=c)
    y = kernels.normalize(x, running_mean, 1.0 / np.sqrt(running_var + 1e-5), gamma, beta)
    y_ref = reference.forward_inference(x64, gamma, beta, running_mean, running_var)
    assert y.dtype == dtype and same_layout(y, x)
    close(y, y_ref, dtype)


@pytest.mark.parametrize("affine", [True, False])
def test_none_gamma_beta_mean_one_and_zero(rng, affine):
    x = rng.normal(size=(6, 3, 10))
    gamma, beta = (rng.normal(size=3), rng.normal(size=3)) if affine else (None, None)
    y, *_ = kernels.forward_train(x, gamma, beta, 1e-5)
    y_ref, cache = reference.forward(x, gamma, beta)
    close(y, y_ref, np.float64)
    dy = rng.normal(size=x.shape)
    dx, _, _ = kernels.backward(dy, x, cache.mean, cache.invstd, gamma)
    close(dx, reference.backward(dy, cache)[0], np.float64)


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("out_layout", ["contiguous", "channels_last"])
def test_out_is_written_and_returned(rng, layout, out_layout):
    x = make(rng, (4, 3, 5, 6), np.float32, layout)
    out = make(rng, x.shape, np.float32, out_layout)
    y, *_ = kernels.forward_train(x, None, None, 1e-5, out=out)
    assert y is out
    np.testing.assert_allclose(out, kernels.forward_train(x, None, None, 1e-5)[0], rtol=1e-6, atol=1e-6)
    mean, _, invstd = kernels.forward_train(x, None, None, 1e-5)[1:]
    dx_out = np.empty_like(out)
    dx = kernels.backward(x, x, mean, invstd, None, out=dx_out)[0]
    assert dx is dx_out


def test_constant_channel_gives_finite_zero_output():
    x = np.full((8, 2, 3, 3), 7.0, np.float32)
    x[:, 1] = np.arange(8 * 9, dtype=np.float32).reshape(8, 3, 3)
    y, mean, var, invstd = kernels.forward_train(x, None, None, 1e-5)
    assert np.all(np.isfinite(y)) and np.all(y[:, 0] == 0.0)
    assert var[0] == 0.0 and invstd[0] == pytest.approx(1.0 / np.sqrt(1e-5), rel=1e-6)
    dx, dgamma, dbeta = kernels.backward(np.ones_like(x), x, mean, invstd, None)
    assert np.all(np.isfinite(dx)) and np.all(np.isfinite(dgamma))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("shape", [(32, 4, 16, 16), (4096, 8)])
def test_large_offset_tiny_spread_float32(rng, shape, layout, path):
    # E[x^2] - E[x]^2 in float32 loses every digit here; the two-pass kernels must not.
    x = make(rng, shape, np.float32, layout, loc=1e4, scale=1e-2)
    y, mean, var, _ = kernels.forward_train(x, None, None, 1e-5)
    y_ref, cache = reference.forward(x.astype(np.float64), None, None)
    # y is in units of std, so this bounds the error at 1e-5 of the spread.
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * np.max(np.abs(y_ref)))
    np.testing.assert_allclose(var, cache.var, rtol=1e-5)
    # Given float64 statistics, the backward forms x - mean per element and stays as exact.
    dy = make(rng, shape, np.float32, "contiguous")
    dx_ref, dgamma_ref, _ = reference.backward(dy.astype(np.float64), cache)
    dx, dgamma, _ = kernels.backward(dy, x, cache.mean, cache.invstd, None)
    np.testing.assert_allclose(dx, dx_ref, rtol=0, atol=1e-5 * np.max(np.abs(dx_ref)))
    np.testing.assert_allclose(dgamma, dgamma_ref, rtol=0, atol=1e-5 * np.max(np.abs(dgamma_ref)))


@pytest.mark.parametrize("drift", ["along_n", "first_run_outlier", "none"])
def test_fused_channels_first_one_pass_stats_stay_exact(rng, drift):
    # forward_train_cf sums x - k in float64 about a shift k (each channel's mean over
    # x[0, c]); k far from the mean (data drifting along N, an outlying first run) costs at
    # most log2(N + 1) bits. float32 at mean 1e4, spread 1e-2: E[x^2] - E[x]^2 would lose every
    # digit.
    shape = (16, 8, 7, 7)
    x = rng.normal(1e4, 1e-2, shape).astype(np.float32)
    if drift == "along_n":
        x += np.arange(16, dtype=np.float32)[:, None, None, None] * 0.05
    elif drift == "first_run_outlier":
        x[0, :3] += 1e3  # 1e5 spreads away
    xv = x.reshape(16, 8, 49)
    assert _dispatch._channel_blocks(16, 8, 49, 4, 1, 2) and _dispatch._channel_blocks(16, 8, 49, 4, 1, 1)
    y, mean, var, _ = kernels.forward_train(x, None, None, 1e-5)
    x64 = xv.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=(0, 2)), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var(axis=(0, 2)), rtol=1e-5)
    y_ref = reference.forward(x.astype(np.float64), None, None)[0]
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=1e-5 * np.max(np.abs(y_ref)))


@pytest.mark.parametrize("order", ["sorted", "outlier_first_rows", "shuffled"])
def test_rows_stats_shift_fallbacks_stay_exact(rng, order):
    # stats_rows sums x - k in float32 about a shift k (its first rows' mean); channels where
    # k is far from the block mean are redone exactly: sorted rows (every channel, the whole
    # block) and a few channels whose first rows sit 1e3 std away (column by column).
    x = rng.normal(1e4, 1e-2, (2048, 96)).astype(np.float32)
    if order == "sorted":
        x.sort(axis=0)
    elif order == "outlier_first_rows":
        x[:8, :3] += 10.0
    mean, var = kernels.channel_stats(x)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(mean, x64.mean(axis=0), rtol=1e-7)
    np.testing.assert_allclose(var, x64.var(axis=0), rtol=1e-5)


def test_empty_batch_returns_empty_output_and_nan_stats():
    x = np.zeros((0, 3, 4), np.float32)
    y, mean, var, invstd = kernels.forward_train(x, None, None, 1e-5)
    assert y.shape == x.shape and mean.shape == (3,) and np.all(np.isnan(mean))
    dx, dgamma, dbeta = kernels.backward(x, x, mean, invstd, None)
    assert dx.shape == x.shape and np.all(dbeta == 0)


@given(
    shape=st.tuples(st.integers(1, 5), st.integers(1, 6)).flatmap(
        lambda nc: st.lists(st.integers(1, 6), max_size=3).map(lambda sp: (*nc, *sp))
    ),
    # |loc| / scale up to 1e6: beyond that float64 data itself carries no digits of the spread.
    loc=st.floats(-1e4, 1e4),
    log_scale=st.floats(-2, 6),
    channels_last=st.booleans(),
    split=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_property_float64_matches_reference(shape, loc, log_scale, channels_last, split, seed):
    rng = np.random.default_rng(seed)
    if np.prod(shape) // shape[1] < 2:
        shape = (shape[0] + 1, *shape[1:])
    x = make(rng, shape, np.float64, "channels_last" if channels_last else "contiguous", loc, 10.0**log_scale)
    gamma, beta = rng.normal(size=shape[1]), rng.normal(size=shape[1])
    dy = rng.normal(size=shape)
    with forced_split() if split else contextlib.nullcontext():
        y, mean, var, invstd = kernels.forward_train(x, gamma, beta, 1e-5)
        dx, dgamma, dbeta = kernels.backward(dy, x, mean, invstd, gamma)
    y_ref, cache = reference.forward(x, gamma, beta)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy, cache)
    # Deviations are relative to the data's spread (values carry |loc| absolute rounding).
    spread = np.sqrt(cache.var) + 1e-300
    assert np.all(np.abs(mean - cache.mean) <= 1e-12 * (np.abs(cache.mean) + spread))
    np.testing.assert_allclose(var, cache.var, rtol=1e-9)
    # Errors are measured against the scale of the terms each output sums (dx can cancel to ~0).
    x_hat = np.max(np.abs(cache.x_hat))
    scales = {
        "y": np.max(np.abs(gamma)) * x_hat + np.max(np.abs(beta)),
        "dx": np.max(np.abs(gamma * cache.invstd)) * np.max(np.abs(dy)),
        "dgamma": np.sum(np.abs(dy)) * x_hat,
        "dbeta": np.sum(np.abs(dy)),
    }
    outputs = {
        "y": (y, y_ref),
        "dx": (dx, dx_ref),
        "dgamma": (dgamma, dgamma_ref),
        "dbeta": (dbeta, dbeta_ref),
    }
    for name, (got, want) in outputs.items():
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-9 * scales[name], err_msg=name)


def test_thread_count_follows_torch_then_override(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(get_num_threads=lambda: 1))
    assert kernels.num_threads() == 1
    kernels.set_num_threads(2 if _dispatch.numba.config.NUMBA_NUM_THREADS >= 2 else 1)
    try:
        assert kernels.num_threads() == min(2, _dispatch.numba.config.NUMBA_NUM_THREADS)
    finally:
        kernels.set_num_threads(None)
    for bad in (0, -1, 2.5, True, 10**6):
        with pytest.raises(ValueError, match="set_num_threads: n must be an int"):
            kernels.set_num_threads(bad)


@pytest.mark.skipif(_dispatch.numba.config.NUMBA_NUM_THREADS < 2, reason="needs a pool of 2 threads")
def test_parallel_call_restores_numba_thread_count_changed_in_between():
    # the kernels read numba's count through its raw getter after the first parallel call:
    # a count the program changed since then (numba.set_num_threads) must still be seen
    numba = _dispatch.numba
    kernels.set_num_threads(2)
    try:
        assert _dispatch._use_threads(_dispatch._PARALLEL_MIN) == 2
        assert numba.get_num_threads() == 2
        numba.set_num_threads(1)
        assert _dispatch._use_threads(_dispatch._PARALLEL_MIN) == 2
        assert numba.get_num_threads() == 2
    finally:
        kernels.set_num_threads(None)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda x: kernels.forward_train(x.astype(np.int32), None, None, 1e-5),
            TypeError,
            "x: expected float16",
        ),
        (lambda x: kernels.forward_train(x[0, 0], None, None, 1e-5), ValueError, "x: expected shape"),
        (
            lambda x: kernels.forward_train(x, np.ones(4), None, 1e-5),
            ValueError,
            r"gamma: expected shape \(3,\)",
        ),
        (
            lambda x: kernels.backward(x[:1], x, np.zeros(3), np.ones(3), None),
            ValueError,
            "dy: expected x's shape",
        ),
        (
            lambda x: kernels.normalize(x, np.zeros(3), np.ones(3), out=np.empty(3)),
            ValueError,
            "out: expected",
        ),
        (lambda x: kernels.channel_stats(x.tolist()), TypeError, "x: expected a NumPy array"),
        (
            lambda x: kernels.forward_train(x, None, None, 1e-5, out=np.broadcast_to(x, x.shape)),
            ValueError,
            "out: expected a writeable array",
        ),
    ],
)
def test_bad_input_names_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call(np.ones((2, 3, 4)))


def test_kernels_are_cached_on_disk_and_listed():
    from batchnorm.kernels import backward as _  # noqa: F401 - the module, via sys.modules below
    from batchnorm.kernels import forward, running, stats

    modules = [sys.modules["batchnorm.kernels.backward"], forward, stats, running]
    jitted = list({id(f): f for m in modules for f in vars(m).values() if hasattr(f, "py_func")}.values())
    jitted += [f.serial for f in jitted if hasattr(f, "serial")]
    jitted = list({id(f): f for f in jitted}.values())  # a twin may also have a module-level name
    # 16 kernels with serial twins + _reduce_block, _stats_block, normalize_running_rows,
    # running_vectors, channel_block_stats, _reduce_cf, _dx_cf, _split_vectors,
    # _normalize_vectors; running_step(_counted)
    assert len(jitted) == 43
    assert all(type(f._cache).__name__ == "FunctionCache" for f in jitted)
    rows = kernels.backend_table()
    assert {"float32", "float64", "float16"} <= {r["input"] for r in rows}
    assert all(set(r) == {"input", "layout", "kernel"} for r in rows)


@pytest.mark.parametrize("threads", [1, None])
@pytest.mark.parametrize("shape", [(16384, 3), (16, 5, 32, 32)])
def test_narrow_rows_regrouped_match_reference(rng, shape, threads, monkeypatch):
    # Channels-last / (N, C) with C < 64 run as rows of C*k "virtual channels" (``_widen``);
    # one thread sends a small one to the one-call kernels (forward_rows, backward_rows).
    monkeypatch.setattr(_dispatch, "_threads_override", threads)
    x = make(rng, shape, np.float32, "channels_last" if len(shape) > 2 else "contiguous", loc=5.0)
    rows = x.size // shape[1]
    assert _dispatch._widen(rows, shape[1], x.size) > 1
    dy = make(rng, shape, np.float32, "contiguous")
    y, mean, var, invstd = kernels.forward_train(x, None, None, 1e-5)
    y_ref, cache = reference.forward(x.astype(np.float64), None, None)
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy.astype(np.float64), cache)
    close(y, y_ref, np.float32)
    close(var, cache.var, np.float32)
    dx, dgamma, dbeta = kernels.backward(dy, x, cache.mean, cache.invstd, None)
    close(dx, dx_ref, np.float32)
    close(dgamma, dgamma_ref, np.float32, scale=np.sum(np.abs(dy)) / shape[1])
    close(dbeta, dbeta_ref, np.float32, scale=np.sum(np.abs(dy)) / shape[1])


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_child_forked_after_parallel_use_runs_single_threaded():
    # GNU OpenMP kills a forked child on its first parallel region; ours falls back to serial.
    code = (
        "import os, numpy as np\n"
        "from batchnorm import kernels\n"
        "x = np.random.default_rng(0).random((8, 4, 64, 64), dtype=np.float32)\n"
        "kernels.set_num_threads(min(2, kernels._dispatch.numba.config.NUMBA_NUM_THREADS))\n"
        "parent = kernels.forward_train(x, None, None, 1e-5)[1]\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    child = kernels.forward_train(x, None, None, 1e-5)[1]\n"
        "    os._exit(0 if kernels.num_threads() == 1 and np.allclose(child, parent) else 3)\n"
        "print(os.waitpid(pid, 0)[1])\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0", result.stderr


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 16), (2, 3), (300, 7)])
def test_small_rows_shortcut_is_the_general_path_bit_for_bit(rng, shape, dtype):
    # out= takes the general layout machinery; out=None on a small C-contiguous (N, C) array
    # the direct .serial call (``_dispatch._small_rows``): the same kernel, the same bits.
    x = make(rng, shape, dtype, "contiguous", loc=5.0, scale=2.0)
    gamma, beta = rng.normal(size=(2, shape[1])).astype(dtype)
    assert _dispatch._small_rows(x)
    fast = kernels.forward_train(x, gamma, beta, 1e-5)
    general = kernels.forward_train(x, gamma, beta, 1e-5, out=np.empty_like(x))
    for a, b in zip(fast, general, strict=True):
        np.testing.assert_array_equal(a, b)
    want = reference.forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64), 1e-5)[0]
    np.testing.assert_allclose(fast[0], want, rtol=RTOL[dtype], atol=RTOL[dtype])
    mean, invstd = fast[1], fast[3]
    for dy in (np.broadcast_to(np.asarray(1.5, dtype), shape), make(rng, shape, dtype, "contiguous")):
        fast_b = kernels.backward(dy, x, mean, invstd, gamma)
        general_b = kernels.backward(dy, x, mean, invstd, gamma, out=np.empty_like(x))
        for a, b in zip(fast_b, general_b, strict=True):
            np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        kernels.normalize(x, mean, invstd, gamma, beta),
        kernels.normalize(x, mean, invstd, gamma, beta, out=np.empty_like(x)),
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "shape", [(64, 16), (3, 1), (300, 7), (9, 4, 5, 5), (4096, 16), (1024, 96), (600, 1024), (2, 3, 64, 64)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_normalize_running_matches_reference_and_normalize(rng, shape, dtype, affine):
    # Small C-contiguous (N, C) arrays, and larger ones of >= 64 channels (here (1024, 96)),
    # take the one-call kernel (normalize_running_rows); other C-contiguous arrays the general
    # kernels with compiled vector set-up (_predict_contiguous: (600, 1024) on the parallel rows
    # kernel, (9, 4, 5, 5) and (2, 3, 64, 64) channels-first): all give normalize's bits with
    # invstd in float64; normalize runs (1024, 96) on the parallel rows kernel.
    x = make(rng, shape, dtype, "contiguous", loc=1e4 if dtype == np.float64 else 50.0, scale=2.0)
    c = shape[1]
    running_mean = (x.mean(axis=tuple(i for i in range(x.ndim) if i != 1)) + 0.3).astype(dtype)
    running_var = rng.uniform(0.5, 4.0, c).astype(dtype)
    gamma, beta = rng.normal(size=(2, c)).astype(dtype) if affine else (None, None)
    y = kernels.normalize_running(x, running_mean, running_var, 1e-5, gamma, beta)
    assert y.dtype == x.dtype and y.shape == x.shape
    want = reference.forward_inference(
        x.astype(np.float64), gamma, beta, running_mean.astype(np.float64), running_var.astype(np.float64)
    )
    np.testing.assert_allclose(y, want, rtol=RTOL[dtype], atol=RTOL[dtype])
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + 1e-5)
    np.testing.assert_array_equal(y, kernels.normalize(x, running_mean, invstd, gamma, beta))
    # vectors of another dtype (here float64 for float32 x) take the general path, same values
    wide = kernels.normalize_running(x, running_mean.astype(np.float64), running_var.astype(np.float64), 1e-5)
    np.testing.assert_allclose(wide, kernels.normalize_running(x, running_mean, running_var, 1e-5), rtol=1e-6)


def test_normalize_running_rejects_a_wrong_length_vector(rng):
    x = make(rng, (8, 4), np.float32, "contiguous")
    with pytest.raises(ValueError, match="running_var: expected shape \\(4,\\)"):
        kernels.normalize_running(x, np.zeros(4, np.float32), np.ones(3, np.float32), 1e-5)
    with pytest.raises(ValueError, match="mean: expected shape \\(4,\\)"):
        kernels.normalize_running(x, np.zeros(5, np.float32), np.ones(4, np.float32), 1e-5)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_update_running_matches_reference_and_numpy_ops(rng, dtype):
    rm, rv = rng.normal(size=9).astype(dtype), rng.uniform(0.5, 2, 9).astype(dtype)
    mean, var = rng.normal(size=9).astype(dtype), rng.uniform(0.5, 2, 9).astype(dtype)
    want_mean, want_var = reference.update_running(rm, rv, mean, var, 40, 0.1)
    # the NumPy expressions the compiled update replaced, bit for bit
    np_mean, np_var = rm.copy(), rv.copy()
    np_mean *= 1.0 - 0.1
    np_mean += 0.1 * mean
    np_var *= 1.0 - 0.1
    np_var += (0.1 * 40 / 39) * var
    _dispatch.update_running_(rm, rv, mean, var, 40, 0.1)
    np.testing.assert_array_equal(rm, np_mean)
    np.testing.assert_array_equal(rv, np_var)
    np.testing.assert_allclose(rm, want_mean, rtol=RTOL[dtype], atol=RTOL[dtype])
    np.testing.assert_allclose(rv, want_var, rtol=RTOL[dtype])


def test_update_running_rounds_float64_statistics_as_astype_would(rng):
    # forward_train hands float32 buffers the float64 statistics; the compiled update rounds
    # them itself, to the bits of rounding them first
    rm, rv = rng.normal(size=9).astype(np.float32), rng.uniform(0.5, 2, 9).astype(np.float32)
    mean, var = rng.normal(size=9), rng.uniform(0.5, 2, 9)
    want_mean, want_var = rm.copy(), rv.copy()
    _dispatch.update_running_(want_mean, want_var, mean.astype(np.float32), var.astype(np.float32), 40, 0.1)
    _dispatch.update_running_(rm, rv, mean, var, 40, 0.1)
    np.testing.assert_array_equal(rm, want_mean)
    np.testing.assert_array_equal(rv, want_var)
    # and through forward_train, the buffers end as with the rounded statistics it returns
    x = make(rng, (64, 9), np.float32, "contiguous", loc=3.0)
    rm, rv = np.zeros(9, np.float32), np.ones(9, np.float32)
    _, mean32, var32, _ = kernels.forward_train(x, None, None, 1e-5, running=(rm, rv, None, 0.1))
    want_mean, want_var = np.zeros(9, np.float32), np.ones(9, np.float32)
    _dispatch.update_running_(want_mean, want_var, mean32, var32, 64, 0.1)
    np.testing.assert_array_equal(rm, want_mean)
    np.testing.assert_array_equal(rv, want_var)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, 1, 0.0])
def test_update_running_with_a_counter_is_the_update_plus_one_count(rng, dtype, momentum):
    rm, rv = rng.normal(size=7).astype(dtype), rng.uniform(0.5, 2, 7).astype(dtype)
    mean, var = rng.normal(size=7).astype(dtype), rng.uniform(0.5, 2, 7).astype(dtype)
    want_mean, want_var = rm.copy(), rv.copy()
    _dispatch.update_running_(want_mean, want_var, mean, var, 12, momentum)
    tracked = np.array(41, np.int64)  # 0-d, as num_batches_tracked.numpy()
    _dispatch.update_running((rm, rv, tracked, momentum), mean, var, 12)
    np.testing.assert_array_equal(rm, want_mean)
    np.testing.assert_array_equal(rv, want_var)
    assert tracked.shape == () and int(tracked) == 42


def test_fused_channel_blocks_need_long_runs_or_small_blocks():
    """Large blocks of short strided runs take the unfused path (in a training forward with
    S < 32, one block per thread when x is small enough); short runs in small blocks and long
    runs in large blocks stay fused."""
    blocks = _dispatch._channel_blocks

    def train_forward(n, c, s, threads=2):
        return blocks(n, c, s, 4, 1, threads, train_forward=True)

    assert train_forward(256, 16, 1024) == 0  # 1 MB blocks of 4 KB runs
    assert train_forward(128, 256, 16) == 2  # S = 16, 2 MiB: one block per thread
    assert train_forward(128, 256, 16, threads=4) == 4
    assert train_forward(128, 255, 16) == 0  # 255 channels do not split evenly
    assert train_forward(256, 512, 16) == 2  # 8 MiB
    assert train_forward(512, 512, 16) == 0  # 16 MiB
    assert train_forward(128, 64, 256) == 0  # S = 256
    assert blocks(128, 256, 16, 4, 1, 2) == 0  # a single pass stays unfused
    assert blocks(128, 256, 16, 4, 2, 2) == 0  # and so does the backward
    assert blocks(64, 128, 16, 4, 1, 2) == 2  # 256 KB blocks of 4 KB runs
    assert blocks(16, 64, 112 * 112, 4, 1, 2) == 64  # 800 KB blocks of 50 KB runs
    assert blocks(16, 2048, 49, 4, 2, 2) > 0


def test_short_run_blocks_fused_one_per_thread_match_reference(rng, monkeypatch):
    """The forward's one-block-per-thread fallback for short runs (tiny thresholds make a
    test-sized input take it) computes what the reference does, and the backward after it."""
    monkeypatch.setattr(_dispatch, "_CHANNEL_BLOCK_BYTES", 64)
    monkeypatch.setattr(_dispatch, "_MIN_RUN_BYTES", 1 << 30)
    monkeypatch.setattr(_dispatch, "_PARALLEL_MIN", 0)
    shape = (8, 6, 5, 5)  # S < 32, and N < 16: not read as rows (``_short_runs``)
    threads = kernels.num_threads()
    expected = threads if 6 % threads == 0 else 0
    assert _dispatch._channel_blocks(8, 6, 25, 4, 1, threads, train_forward=True) == expected
    x = make(rng, shape, np.float32, "contiguous", loc=3.0, scale=2.0)
    dy = make(rng, shape, np.float32, "contiguous")
    gamma = rng.normal(1.0, 0.5, 6).astype(np.float32)
    beta = rng.normal(0.0, 1.0, 6).astype(np.float32)
    y_ref, cache = reference.forward(x.astype(np.float64), gamma.astype(np.float64), beta.astype(np.float64))
    dx_ref, dgamma_ref, dbeta_ref = reference.backward(dy.astype(np.float64), cache)
    y, mean, _, invstd = kernels.forward_train(x, gamma, beta, 1e-5)
    dx, dgamma, dbeta = kernels.backward(dy, x, mean, invstd, gamma)
    for actual, expected in ((y, y_ref), (dx, dx_ref), (dgamma, dgamma_ref), (dbeta, dbeta_ref)):
        close(actual, expected, np.float32)


def test_stale_numba_caches_are_dropped_when_a_kernel_source_changes(tmp_path):
    from batchnorm.kernels import _jit

    (tmp_path / "stats.py").write_text("A = 1\n")
    (tmp_path / "forward.py").write_text("B = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    compiled = [
        cache / "forward.forward_rows-1.py311.nbi",
        cache / "forward.forward_rows-1.py311.1.nbc",
    ]
    for path in compiled:
        path.write_bytes(b"old machine code")
    (cache / "forward.cpython-311.pyc").write_bytes(b"bytecode")
    assert _jit.drop_stale_caches(tmp_path)  # no stamp yet: nothing known to be current
    assert not any(p.exists() for p in compiled) and (cache / "forward.cpython-311.pyc").exists()
    compiled[0].write_bytes(b"new machine code")
    assert not _jit.drop_stale_caches(tmp_path)  # sources unchanged: the cache stays
    assert compiled[0].exists()
    (tmp_path / "stats.py").write_text("A = 2\n")  # a helper edited in another file
    assert _jit.drop_stale_caches(tmp_path)
    assert not compiled[0].exists()


@pytest.mark.parametrize(
    "shape, one_call",
    [((64, 16), True), ((1024, 96), True), ((4096, 128), False), ((8192, 32), False), ((2048, 64), True)],
)
def test_prediction_on_rows_takes_the_one_call_kernel_below_its_limit(monkeypatch, shape, one_call):
    # Rows of >= 64 channels below _SERIAL_EVAL_MAX elements (524288) run the one-call kernel;
    # (8192, 32) would be regrouped for the parallel path, (4096, 128) is at the limit.
    calls = []
    kernel = _dispatch.normalize_running_rows
    monkeypatch.setattr(_dispatch, "normalize_running_rows", lambda *a: calls.append(1) or kernel(*a))
    x = np.ones(shape, np.float32)
    c = shape[1]
    y = kernels.normalize_running(x, np.full(c, 1.0, np.float32), np.full(c, 4.0, np.float32), 0.0)
    assert len(calls) == int(one_call)
    np.testing.assert_array_equal(y, np.zeros(shape, np.float32))


@pytest.mark.parametrize(
    "shape, dtype, layout",
    [
        ((64, 16), np.float32, "contiguous"),  # small rows: the direct one-thread call
        ((300, 7), np.float64, "contiguous"),
        ((4096, 64), np.float32, "contiguous"),  # parallel rows kernel, then update_running
        ((4, 3, 5, 5), np.float64, "channels_last"),
        ((4, 3, 5, 5), np.float32, "sliced"),
        ((64, 16), np.float16, "contiguous"),  # float16 buffers: NumPy's update
    ],
)
@pytest.mark.parametrize("counted", [True, False])
def test_forward_train_updates_running_buffers_as_update_running(rng, shape, dtype, layout, counted):
    x = make(rng, shape, dtype, layout, loc=3.0, scale=2.0)
    c = shape[1]
    gamma, beta = rng.normal(size=(2, c)).astype(dtype)
    rm, rv = rng.normal(size=c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)
    want_rm, want_rv = rm.copy(), rv.copy()
    tracked = np.array(6, np.int64) if counted else None
    got = kernels.forward_train(x, gamma, beta, 1e-5, running=(rm, rv, tracked, 0.25))
    plain = kernels.forward_train(x, gamma, beta, 1e-5)
    for a, b in zip(got, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    _dispatch.update_running_(want_rm, want_rv, plain[1], plain[2], x.size // c, 0.25)
    np.testing.assert_array_equal(rm, want_rm)
    np.testing.assert_array_equal(rv, want_rv)
    if counted:
        assert int(tracked) == 7
    # and against the reference: unbiased variance in the running estimate
    _, cache = reference.forward(x.astype(np.float64), None, None)
    m = x.size // c
    start_rv = (want_rv - 0.25 * plain[2].astype(np.float64) * m / (m - 1)) / 0.75
    np.testing.assert_allclose(
        rv, 0.75 * start_rv + 0.25 * cache.var * m / (m - 1), rtol=RTOL[dtype] * 10, atol=RTOL[dtype]
    )


@pytest.mark.parametrize(
    "running, error, match",
    [
        ([np.zeros(4), np.ones(4), None, 0.1], TypeError, "running: expected a tuple"),
        ((np.zeros(3, np.float32), np.ones(4, np.float32), None, 0.1), ValueError, r"running_mean: .*\(4,\)"),
        ((np.zeros(4, np.float32), np.ones(4, np.int32), None, 0.1), ValueError, "running_var: .*floating"),
        ((np.zeros(4, np.float32), np.ones(4, np.float64), None, 0.1), TypeError, "running_var: expected"),
        (
            (np.zeros(4, np.float32), np.ones(4, np.float32), np.zeros(1), 0.1),
            ValueError,
            "num_batches_tracked",
        ),
        (
            (np.zeros(4, np.float32), np.ones(4, np.float32), None, "0.1"),
            TypeError,
            "momentum: expected a number",
        ),
    ],
)
def test_forward_train_rejects_bad_running_buffers_before_any_update(rng, running, error, match):
    x = make(rng, (8, 4), np.float32, "contiguous")
    before = [np.copy(v) if isinstance(v, np.ndarray) else v for v in running]
    with pytest.raises(error, match=match):
        kernels.forward_train(x, None, None, 1e-5, running=running)
    for old, new in zip(before, running, strict=True):
        if isinstance(old, np.ndarray):
            np.testing.assert_array_equal(old, new)


def test_forward_train_needs_two_values_per_channel_to_update_running(rng):
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernels.forward_train(np.ones((1, 4), np.float32), None, None, 1e-5, running=(rm, rv, None, 0.1))
    np.testing.assert_array_equal(rv, 1.0)


def test_read_only_running_buffers_are_rejected(rng):
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    rv.flags.writeable = False
    with pytest.raises(ValueError, match="running_var: expected a writeable"):
        kernels.forward_train(
            make(rng, (8, 4), np.float32, "contiguous"), None, None, 1e-5, running=(rm, rv, None, 0.1)
        )
    np.testing.assert_array_equal(rm, 0.0)


@pytest.mark.parametrize("layout", ["channels_last", "fortran", "sliced"])
@pytest.mark.parametrize("shape", [(6, 5, 7, 3), (40, 64), (3, 4, 2, 5, 6)])
def test_normalize_running_keeps_the_layout_and_normalizes_bits(rng, layout, shape):
    # channels-last rows take _predict_canonical, the others the general path: every output
    # has normalize's bits, and channels-last stays channels-last
    x = make(rng, shape, np.float32, layout, loc=20.0, scale=3.0)
    c = shape[1]
    running_mean = rng.normal(20.0, 1.0, c).astype(np.float32)
    running_var = rng.uniform(0.5, 4.0, c).astype(np.float32)
    gamma, beta = rng.normal(size=(2, c)).astype(np.float32)
    y = kernels.normalize_running(x, running_mean, running_var, 1e-5, gamma, beta)
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + 1e-5)
    np.testing.assert_array_equal(y, kernels.normalize(x, running_mean, invstd, gamma, beta))
    if layout == "channels_last":
        assert np.argsort(y.strides).tolist() == np.argsort(x.strides).tolist()


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "layout"),
    [
        ((6, 5, 7, 7), "contiguous"),  # normalize_running_cf, one thread
        ((16, 64, 9, 9), "contiguous"),  # two threads
        ((8, 12, 9, 9), "channels_last"),  # predict_rows, 12 channels regrouped
        ((1024, 600), "contiguous"),  # predict_rows, two threads (above _SERIAL_EVAL_MAX)
    ],
)
def test_prediction_in_one_call_has_normalize_bits(rng, shape, layout, dtype, affine):
    # normalize_running_cf and predict_rows form the vectors inside the compiled call: the
    # bits of the NumPy vectors and normalize's kernels, at an offset where a sloppy split of
    # the mean shows
    x = make(rng, shape, dtype, layout, loc=1e4, scale=1e-2)
    c = shape[1]
    running_mean = rng.normal(1e4, 1e-3, c).astype(dtype)
    running_var = rng.uniform(1e-5, 1e-4, c).astype(dtype)
    gamma, beta = rng.normal(size=(2, c)).astype(dtype) if affine else (None, None)
    if layout == "contiguous" and x.ndim > 2:
        assert not _dispatch._short_runs(x.reshape(shape[0], c, -1))
    else:
        assert not _dispatch._serial_eval_rows(x)
    y = kernels.normalize_running(x, running_mean, running_var, 1e-5, gamma, beta)
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + 1e-5)
    np.testing.assert_array_equal(y, kernels.normalize(x, running_mean, invstd, gamma, beta))
    y_ref = reference.forward_inference(
        x.astype(np.float64),
        None if gamma is None else gamma.astype(np.float64),
        None if beta is None else beta.astype(np.float64),
        running_mean.astype(np.float64),
        running_var.astype(np.float64),
    )
    close(y, y_ref, dtype)


@pytest.mark.parametrize("shape", [(3, 4, 1, 1), (5, 6), (2, 3, 4, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_outputs_have_the_strides_of_a_canonical_input(rng, shape, layout):
    # _Output and _predict_canonical allocate canonical outputs directly (_canonical_empty):
    # the same strides as x, also for size-1 spatial axes
    x = make(rng, shape, np.float32, layout, loc=2.0)
    c = shape[1]
    y, mean, _, invstd = kernels.forward_train(x, None, None, 1e-5)
    dx = kernels.backward(x, x, mean, invstd, None)[0]
    pred = kernels.normalize_running(x, mean, np.ones(c, np.float32), 1e-5)
    assert y.strides == dx.strides == pred.strides == x.strides


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_forward_train_stats64_are_the_unrounded_statistics(rng, path, shape, dtype, layout):
    """``stats64=True``: the same y, the statistics in float64 that round to the default ones,
    and at mean 1e4, std 1e-2 a mean exact to float64 rounding, not float32's ~5e-4."""
    x = make(rng, shape, dtype, layout, loc=1e4, scale=1e-2)
    y, *stats = kernels.forward_train(x, None, None, 1e-5)
    y64, *stats64 = kernels.forward_train(x, None, None, 1e-5, stats64=True)
    np.testing.assert_array_equal(y64, y)
    for rounded, full in zip(stats, stats64, strict=True):
        assert full.dtype == np.float64 and full.shape == (shape[1],)
        np.testing.assert_array_equal(full.astype(dtype), rounded)
    _, cache = reference.forward(x.astype(np.float64), None, None)
    np.testing.assert_allclose(stats64[0], cache.mean, rtol=1e-14, atol=0)
    np.testing.assert_allclose(stats64[1], cache.var, rtol=1e-6 if dtype == np.float32 else 1e-9, atol=0)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    ("shape", "layout", "forward", "backward"),
    [
        ((1024, 40), "contiguous", "rows", "rows"),  # above the one-thread small-rows path
        ((8, 12, 9, 9), "channels_last", "rows", "rows"),
        ((64, 6, 3, 3), "contiguous", "rows", "rows"),  # short maps read as rows of C * S
        ((4, 9, 64), "contiguous", "fused", "fused"),
        ((2, 3, 64, 64), "contiguous", "two_pass", "two_pass"),
    ],
)
def test_a_kept_plan_gives_the_first_calls_bits(rng, shape, layout, forward, backward, dtype, monkeypatch):
    # the first call of a canonical input decides its layout and kernel split and keeps them
    # (_plan); later calls skip the deciding (_prepare, _Output, ...) and must match it bit for bit
    monkeypatch.setattr(_dispatch, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(_dispatch, "_PLANS", {})
    if forward == "two_pass":
        monkeypatch.setattr(_dispatch, "_SLAB_BYTES", 0)
    x = make(rng, shape, dtype, layout, loc=1e3, scale=0.5)
    dy = np.empty_like(x)
    dy[...] = rng.normal(0.2, 1.0, shape)
    gamma = rng.normal(1.0, 0.5, shape[1]).astype(dtype)
    first = kernels.forward_train(x, gamma, None, 1e-5, stats64=True)
    (plan,) = _dispatch._PLANS.values()
    assert (plan.forward[0], plan.backward[0]) == (forward, backward)
    first_back = kernels.backward(dy, x, first[1], first[3], gamma)
    prepared = []
    prepare = _dispatch._prepare
    monkeypatch.setattr(_dispatch, "_prepare", lambda *a: prepared.append(a) or prepare(*a))
    again = kernels.forward_train(x, gamma, None, 1e-5, stats64=True)
    again_back = kernels.backward(dy, x, first[1], first[3], gamma)
    assert prepared == []  # both calls took the kept plan
    for got, want in zip((*again, *again_back), (*first, *first_back), strict=True):
        np.testing.assert_array_equal(got, want)
    assert again[0].strides == x.strides and again_back[0].strides == x.strides
    # dy in another layout than x: the general path, the same values
    dy_other = np.ascontiguousarray(dy) if layout == "channels_last" else np.asfortranarray(dy)
    for got, want in zip(kernels.backward(dy_other, x, first[1], first[3], gamma), first_back, strict=True):
        np.testing.assert_array_equal(got, want)
    assert len(prepared) == 1


def test_plans_follow_the_thresholds_and_stay_bounded(rng, monkeypatch):
    monkeypatch.setattr(_dispatch, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(_dispatch, "_PLANS", {})
    x = make(rng, (4, 9, 64), np.float32, "contiguous", loc=2.0)
    kernels.forward_train(x, None, None, 1e-5)
    assert [p.forward[0] for p in _dispatch._PLANS.values()] == ["fused"]
    monkeypatch.setattr(_dispatch, "_SLAB_BYTES", 0)  # no fused blocks any more: a new plan
    y, *_ = kernels.forward_train(x, None, None, 1e-5)
    assert sorted(p.forward[0] for p in _dispatch._PLANS.values()) == ["fused", "two_pass"]
    y_ref, _ = reference.forward(x.astype(np.float64), None, None)
    close(y, y_ref, np.float32)
    monkeypatch.setattr(_dispatch, "_PLANS_MAX", 2)
    kernels.forward_train(x[:3], None, None, 1e-5)  # a third shape: the kept plans start over
    assert len(_dispatch._PLANS) == 1


@pytest.mark.parametrize(
    ("shape", "layout", "predict"),
    [
        ((1024, 40), "contiguous", "rows"),
        ((8, 12, 9, 9), "channels_last", "rows"),
        ((20, 6, 3, 3), "contiguous", "short"),  # short maps from 16 samples on
        ((4, 9, 64), "contiguous", "cf"),
    ],
)
def test_prediction_from_a_kept_plan_has_normalize_bits(rng, shape, layout, predict, monkeypatch):
    # a training call keeps the input's plan; prediction on the same layout reads it (and
    # keeps one itself when it comes first)
    monkeypatch.setattr(_dispatch, "_PARALLEL_MIN", 0)
    monkeypatch.setattr(_dispatch, "_PLANS", {})
    x = make(rng, shape, np.float32, layout, loc=1e3, scale=0.5)
    c = shape[1]
    running_mean = rng.normal(1e3, 0.1, c).astype(np.float32)
    running_var = rng.uniform(0.1, 1.0, c).astype(np.float32)
    gamma, beta = rng.normal(size=(2, c)).astype(np.float32)
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + 1e-5)
    want = kernels.normalize(x, running_mean, invstd, gamma, beta)
    first = kernels.normalize_running(x, running_mean, running_var, 1e-5, gamma, beta)
    (plan,) = _dispatch._PLANS.values()
    assert plan.predict[0] == predict
    kernels.forward_train(x, gamma, beta, 1e-5)
    assert len(_dispatch._PLANS) == 1  # the same plan serves training
    again = kernels.normalize_running(x, running_mean, running_var, 1e-5, gamma, beta)
    np.testing.assert_array_equal(first, want)
    np.testing.assert_array_equal(again, want)
    assert again.strides == x.strides
