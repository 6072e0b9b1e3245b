"""Forward kernels: the training forward fused per channel, and the normalization pass::

    invstd = 1 / sqrt(var + eps)
    y      = (x - mean) * (invstd * gamma) + beta

The normalization keeps ``x - mean`` first and never folds into ``y = x * a + b`` with
``b = beta - mean * a``: for float32 x with mean 1e4 and std 1e-2, ``x * a`` is ~1e6 and
``x * a + b`` cancels to ~1 losing 6 of float32's 7 digits, while ``x - mean`` is exact for such x
(Sterbenz). The fused kernel computes in float64 and casts on the store; the normalization pass
alone works in x's dtype with a two-part mean (see ``normalize_cf``). Layouts as in ``stats``.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from batchnorm.kernels._jit import FASTMATH, elementwise_kernel, parallel_kernel
from batchnorm.kernels.stats import _stats_block, stats_cf


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def channel_block_stats(x, c0, c1, eps, mean, var, invstd):  # pragma: no cover - compiled
    """mean, biased var and invstd of channels [c0, c1) of x (N, C, S), in one pass about a
    shift k, the channel's mean over its first run x[0, c]::

        d = x - k,  mean = k + sum d / m,  var = (sum d^2 - m (mean - k)^2) / m

    in float64 (never E[x^2] - E[x]^2). The run is part of the channel, so
    ``S (k - mean)^2 <= M2``: the correction is at most N / (N + 1) of ``sum d^2`` and the
    subtraction loses at most log2(N + 1) of float64's 53 bits (4 at N = 16), whatever the
    data. Walked in memory order (n outer, then channels): runs of ``x[n, c0:c1]``.
    """
    n_, _, s_ = x.shape
    m = n_ * s_
    shift = np.empty(c1 - c0)
    for c in range(c0, c1):
        xr = x[0, c]
        total = 0.0
        for i in range(s_):
            total += xr[i]
        shift[c - c0] = total / s_
        mean[c] = 0.0
        var[c] = 0.0
    for n in range(n_):
        for c in range(c0, c1):
            xr = x[n, c]
            k = shift[c - c0]
            s1 = 0.0
            s2 = 0.0
            for i in range(s_):
                d = xr[i] - k
                s1 += d
                s2 += d * d
            mean[c] += s1
            var[c] += s2
    for c in range(c0, c1):
        e = mean[c] / m
        mean[c] = shift[c - c0] + e
        var[c] = (var[c] - m * e * e) / m
        invstd[c] = 1.0 / math.sqrt(var[c] + eps)


@parallel_kernel
def forward_train_cf(x, nb, gamma, beta, eps, y, mean, var, invstd):  # pragma: no cover - compiled
    """x, y: (N, C, S); ``nb`` blocks of consecutive channels, one unit each, three passes.

    A block's slab (N runs of its channels' values) is read from memory once and served from
    cache for the variance and the output passes: 1 read + 1 write of x's size instead of 3
    reads + 1 write. Each pass walks the block in memory order (n outer, then channels, then
    S), so a run is a whole ``x[n, c0:c1]`` (tens of KB) rather than one channel's S values:
    (16, 512, 28, 28) float32, one thread, reused out: 5.0 -> 3.0 ms, (16, 2048, 7, 7):
    1.85 -> 0.83 ms (per-channel units before); a copy of x takes 1.4 ms. Doing the output
    pass in float32 (two-part mean) instead of float64 changed nothing measurable (2.98 vs
    2.89 ms), so it stays float64. The dispatcher uses it when a block's slab fits in
    cache and the blocks split evenly over the threads.

    The statistics take one pass about a shift (``channel_block_stats``). Against two
    passes, the raw kernel, 2 threads, interleaved: (16, 2048, 7, 7)
    816 -> 690 us, (16, 1024, 14, 14) 1226 -> 997 us, (16, 512, 28, 28) 2728 -> 2232 us (a
    short S pays its per-row loop overhead once per pass).
    """
    n_, c_, s_ = x.shape
    for b in prange(nb):
        c0 = b * c_ // nb
        c1 = (b + 1) * c_ // nb
        channel_block_stats(x, c0, c1, eps, mean, var, invstd)
        for n in range(n_):
            for c in range(c0, c1):
                xr = x[n, c]
                yr = y[n, c]
                mu = mean[c]
                scale = invstd[c] * gamma[c]
                shift = beta[c]
                for i in range(s_):
                    yr[i] = (xr[i] - mu) * scale + shift


@elementwise_kernel
def normalize_cf(x, c_, mean_hi, mean_lo, scale, shift, seg, nblk, y):  # pragma: no cover - compiled
    """x, y: (N*C, S), row q of channel q % C; each row split into ``seg`` pieces (units).

    Units in memory order, a contiguous range per thread: one sequential stream in and out.
    (16, 512, 28, 28) float32, one thread, reused out: 3.3 -> 1.5-1.7 ms (channel-major
    units before, 16 runs of 3 KB spaced 1.6 MB apart); a copy of x takes 1.4 ms.

    Whole rows (``seg == 1``, the common case) go in ``nblk`` contiguous ranges of rows, the
    channel stepped along, not divided out: the per-unit ``u // seg``, ``u % seg``,
    ``q % C`` (64-bit integer divisions) and row slices had cost more than a short row's
    arithmetic. 2 threads, kernels.normalize, reused out, interleaved: (16, 2048, 7, 7)
    0.29 -> 0.14 ms, (32, 512, 7, 7) 0.15 -> 0.07 ms, (16, 1024, 14, 14) 0.32 -> 0.22 ms.
    LLVM's vector loop takes 64 values per iteration, with an 8-wide epilogue.

    Arithmetic in x's dtype: the mean comes as ``mean_hi + mean_lo`` (float64 mean split into two
    float32s; ``mean_lo = 0`` for float64), so ``(x - mean_hi) - mean_lo`` keeps float64's
    accuracy where it matters (``x - mean_hi`` is exact for x near the mean) at float32 width:
    (4096, 256) rows, one thread: 0.156 ms vs 0.212 ms in float64; max error 5.5e-7 vs 2.3e-7.
    """
    r_, s_ = x.shape
    if seg == 1:
        for b in prange(nblk):
            q0 = b * r_ // nblk
            c = q0 % c_
            for q in range(q0, (b + 1) * r_ // nblk):
                xr = x[q]
                yr = y[q]
                hi = mean_hi[c]
                lo = mean_lo[c]
                a = scale[c]
                t = shift[c]
                for i in range(s_):
                    yr[i] = ((xr[i] - hi) - lo) * a + t
                c = c + 1 if c + 1 < c_ else 0
        return
    for u in prange(r_ * seg):
        q = u // seg
        p = u % seg
        c = q % c_
        xr = x[q, p * s_ // seg : (p + 1) * s_ // seg]
        yr = y[q, p * s_ // seg : (p + 1) * s_ // seg]
        hi = mean_hi[c]
        lo = mean_lo[c]
        a = scale[c]
        t = shift[c]
        for i in range(xr.shape[0]):
            yr[i] = ((xr[i] - hi) - lo) * a + t


@numba.njit(inline="always", cache=True, error_model="numpy", nogil=True)
def _split_vectors(mean, scale, shift, dtype):  # pragma: no cover - compiled
    """``normalize_cf``'s vectors in ``dtype`` from float64 ones: the mean as ``hi + lo``,
    scale and shift rounded, as NumPy's ``astype`` would."""
    dt = dtype.type
    c_ = mean.shape[0]
    hi = np.empty(c_, dtype)
    lo = np.empty(c_, dtype)
    scale_x = np.empty(c_, dtype)
    shift_x = np.empty(c_, dtype)
    for c in range(c_):
        hi[c] = dt(mean[c])
        lo[c] = dt(mean[c] - hi[c])
        scale_x[c] = dt(scale[c])
        shift_x[c] = dt(shift[c])
    return hi, lo, scale_x, shift_x


@numba.njit(inline="always", cache=True, error_model="numpy", nogil=True)
def _normalize_vectors(c_, gamma, beta, eps, mean, var, invstd, dtype):  # pragma: no cover - compiled
    """``invstd = 1 / sqrt(var + eps)`` filled, and ``_split_vectors`` of mean,
    ``invstd * gamma`` and beta."""
    scale = np.empty(c_)
    for c in range(c_):
        invstd[c] = 1.0 / math.sqrt(var[c] + eps)
        scale[c] = invstd[c] * gamma[c]
    return _split_vectors(mean, scale, beta, dtype)


@numba.njit(cache=True, error_model="numpy", nogil=True)
def forward_two_pass_cf(
    x, c_, gamma, beta, eps, seg, nblk, y, mean, var, invstd
):  # pragma: no cover - compiled
    """The unfused channels-first training forward in one call: ``stats_cf``, then
    ``invstd = 1 / sqrt(var + eps)`` and the vectors, then ``normalize_cf``, on x, y: (N*C, S).

    Each kernel keeps its own compilation (``stats_cf``'s reassociated float64 sums,
    ``normalize_cf``'s compensated ``(x - hi) - lo`` without reassociation); this function
    only chains them, so the bits are those of the two calls with NumPy vector arithmetic
    between them that it replaces. That arithmetic (a sqrt, a division, a product and five
    casts) cost 60-100 us of NumPy calls right after another layer's work had gone through
    the caches, for a few microseconds of work.
    """
    stats_cf(x, c_, seg, nblk, mean, var)
    hi, lo, scale, shift = _normalize_vectors(c_, gamma, beta, eps, mean, var, invstd, x.dtype)
    normalize_cf(x, c_, hi, lo, scale, shift, seg, nblk, y)


_stats_cf_serial = stats_cf.serial
_normalize_cf_serial = normalize_cf.serial


@numba.njit(cache=True, error_model="numpy", nogil=True)
def forward_two_pass_cf_serial(
    x, c_, gamma, beta, eps, seg, nblk, y, mean, var, invstd
):  # pragma: no cover - compiled
    """``forward_two_pass_cf`` on the kernels' single-threaded twins."""
    _stats_cf_serial(x, c_, seg, nblk, mean, var)
    hi, lo, scale, shift = _normalize_vectors(c_, gamma, beta, eps, mean, var, invstd, x.dtype)
    _normalize_cf_serial(x, c_, hi, lo, scale, shift, seg, nblk, y)


forward_two_pass_cf.serial = forward_two_pass_cf_serial


@elementwise_kernel
def normalize_rows(x, mean, scale, shift, run, nblk, y):  # pragma: no cover - compiled
    """x, y: (R, W) rows, column j of channel ``(j // run) % C``: W = groups * C (as
    ``forward_rows``, run 1), or a contiguous (N, C, S) input with short S read as N
    rows of C * S (run S, ``_dispatch._short_runs``); ``mean``, ``scale``, ``shift``: (C,)
    float64. Rows split into ``nblk`` blocks, the inner loop across W.

    ``y = (x - mean_hi) * scale + (shift - mean_lo * scale)`` in x's dtype, with
    ``mean = mean_hi + mean_lo`` split into two of x's dtype: ``x - mean_hi`` is exact near the
    mean, and the low half is folded into the shift once per call, one subtraction less per
    element. 1-D row slices for unit-stride access. One thread, float32, raw kernel:
    (256, 1024) 42 -> 33 us, (4096, 256) 134 -> 120 us (a copy: 23 and 88 us). The vectors
    are cast and tiled here, not in NumPy: kernels.normalize (256, 1024) ~5 us less.
    """
    r_, w_ = x.shape
    c_ = mean.shape[0]
    hi = x[0].copy()
    a = x[0].copy()
    t = x[0].copy()
    # column j = (g * C + c) * run + i, walked in that order (no j // run % C per column)
    j = 0
    for _ in range(w_ // (c_ * run)):
        for c in range(c_):
            for _ in range(run):
                hi[j] = mean[c]
                a[j] = scale[c]
                t[j] = shift[c] - (mean[c] - hi[j]) * a[j]
                j += 1
    for b in prange(nblk):
        for r in range(b * r_ // nblk, (b + 1) * r_ // nblk):
            xr = x[r]
            yr = y[r]
            for j in range(w_):
                yr[j] = (xr[j] - hi[j]) * a[j] + t[j]


@numba.njit(inline="always", cache=True, error_model="numpy", nogil=True)
def running_vectors(running_mean, running_var, eps, gamma, beta):  # pragma: no cover - compiled
    """Prediction's float64 ``(mean, scale, shift)``: running_mean, gamma / sqrt(running_var +
    eps) and beta (gamma, beta: (C,) or None), as the NumPy path forms them."""
    c_ = running_mean.shape[0]
    mean = np.empty(c_)
    scale = np.empty(c_)
    shift = np.zeros(c_)
    for c in range(c_):
        mean[c] = running_mean[c]
        scale[c] = 1.0 / math.sqrt(running_var[c] + eps)
    if gamma is not None:
        for c in range(c_):
            scale[c] *= gamma[c]
    if beta is not None:
        for c in range(c_):
            shift[c] = beta[c]
    return mean, scale, shift


# compiled code calls a dispatcher through a global name, not an attribute
_normalize_rows_serial = normalize_rows.serial


@numba.njit(cache=True, error_model="numpy", nogil=True)
def normalize_running_rows(x, running_mean, running_var, eps, gamma, beta, y):  # pragma: no cover - compiled
    """Prediction on small (R, C) rows from the running statistics: ``normalize_rows`` (one
    thread, one block) with its float64 vectors formed here::

        mean = running_mean,  scale = gamma / sqrt(running_var + eps),  shift = beta

    (gamma, beta: (C,) or None). One compiled call instead of NumPy ufuncs for invstd and the
    float64 vectors in Python: (64, 16) float32 eval, interleaved, kernels.normalize_running
    7.0 -> 3.1 us (the vectors' set-up cost more than the kernel). It calls the same compiled
    normalize_rows as the general path, so the bits are normalize's.
    """
    mean, scale, shift = running_vectors(running_mean, running_var, eps, gamma, beta)
    # one row block: below the dispatcher's _PARALLEL_MIN elements x is under _ROW_BLOCK_BYTES
    _normalize_rows_serial(x, mean, scale, shift, 1, 1, y)


@numba.njit(cache=True, error_model="numpy", nogil=True)
def normalize_running_cf(
    x, c_, running_mean, running_var, eps, gamma, beta, seg, nblk, y
):  # pragma: no cover - compiled
    """Prediction on channels-first x, y: (N*C, S) from the running statistics in one call:
    ``running_vectors``, their split into x's dtype (``mean = hi + lo``), then ``normalize_cf``
    with its own compilation; the bits of the NumPy vector arithmetic and the kernel call it
    replaces (ten NumPy calls: 3-4 us in a loop, 60-100 us right after another layer's work
    had gone through the caches)."""
    mean, scale, shift = running_vectors(running_mean, running_var, eps, gamma, beta)
    hi, lo, scale_x, shift_x = _split_vectors(mean, scale, shift, x.dtype)
    normalize_cf(x, c_, hi, lo, scale_x, shift_x, seg, nblk, y)


@numba.njit(cache=True, error_model="numpy", nogil=True)
def normalize_running_cf_serial(
    x, c_, running_mean, running_var, eps, gamma, beta, seg, nblk, y
):  # pragma: no cover - compiled
    """``normalize_running_cf`` on ``normalize_cf``'s single-threaded twin."""
    mean, scale, shift = running_vectors(running_mean, running_var, eps, gamma, beta)
    hi, lo, scale_x, shift_x = _split_vectors(mean, scale, shift, x.dtype)
    _normalize_cf_serial(x, c_, hi, lo, scale_x, shift_x, seg, nblk, y)


normalize_running_cf.serial = normalize_running_cf_serial


@elementwise_kernel
def forward_rows(
    x, groups, run, nblk, batch_stats, gamma, beta, eps, y, mean, var, invstd
):  # pragma: no cover - compiled
    """x, y: (R, W) rows, column j of channel ``(j // run) % C``: W = groups * C (``groups``
    rows of C channels read as one, see ``_dispatch._widen``; run 1), or a contiguous (N, C, S)
    input with short S read as N rows of C * S (run S, ``_dispatch._short_runs``), both at
    once in general (W = groups * C * run); statistics (with ``batch_stats``) and output in one call.

    1. Per block of rows (one unit each, vectorized across W): mean and M2 in one pass about
       a shift, float32 partial sums, exact fallback (``stats._stats_block``).
    2. Blocks, groups and runs combined per channel (Chan: ``M2 = sum M2_b + n_b (mean_b -
       mean)^2``), written to mean, var and invstd. Without ``batch_stats`` (prediction) steps
       1-2 are skipped and mean and invstd are read as given.
    3. ``y = (x - mean_hi) * scale + (shift - mean_lo * scale)`` in x's dtype (as normalize_rows).

    One call instead of stats_rows + NumPy vector arithmetic + normalize_rows, for every rows
    input: one thread, float32, kernels.forward_train (256, 1024): 89 -> 75 us (the Python
    between the two kernels was ~15 us). Prediction on large rows runs this compiled code too
    (not a parallel normalize_rows): channels-last's first training step and eval call
    compile one large kernel less, ~0.9 s. Compiled without ``reassoc`` (it could undo the
    shift). Short runs read as rows: raw kernel, float32, 2 threads, vs the channels-first
    ``forward_train_cf`` (loop set-up per (n, c) and S below the vector width): (512, 256, 2, 2)
    122 vs 772 us, (1024, 16, 3, 3) 33 vs 176 us, (128, 64, 4, 4) 37 vs 68 us.
    """
    r_, w_ = x.shape
    c_ = w_ // (groups * run)
    if batch_stats:
        bmean = np.empty((nblk, w_))
        bm2 = np.empty((nblk, w_))
        for b in prange(nblk):
            _stats_block(x, b * r_ // nblk, (b + 1) * r_ // nblk, bmean[b], bm2[b])
        m = r_ * groups * run
        for c in range(c_):
            mean[c] = 0.0
            var[c] = 0.0
        # column j = (g * C + c) * run + i, walked in that order (no (j // run) % C per column:
        # a 64-bit division each, ~1.3 ns, 13k of them on (256, 1024) with 4 blocks)
        for b in range(nblk):
            n = (b + 1) * r_ // nblk - b * r_ // nblk
            j = 0
            for _ in range(groups):
                for c in range(c_):
                    for _ in range(run):
                        mean[c] += n * bmean[b, j]
                        j += 1
        for c in range(c_):
            mean[c] /= m
        for b in range(nblk):
            n = (b + 1) * r_ // nblk - b * r_ // nblk
            j = 0
            for _ in range(groups):
                for c in range(c_):
                    for _ in range(run):
                        d = bmean[b, j] - mean[c]
                        var[c] += max(bm2[b, j], 0.0) + n * d * d
                        j += 1
        for c in range(c_):
            var[c] /= m
            invstd[c] = 1.0 / math.sqrt(var[c] + eps)
    hi = x[0].copy()  # vectors in x's dtype, one entry per column
    scale = x[0].copy()
    shift = x[0].copy()
    j = 0
    for _ in range(groups):
        for c in range(c_):
            for _ in range(run):
                hi[j] = mean[c]
                scale[j] = invstd[c] * gamma[c]
                shift[j] = beta[c] - (mean[c] - hi[j]) * scale[j]
                j += 1
    for b in prange(nblk):
        for r in range(b * r_ // nblk, (b + 1) * r_ // nblk):
            xr = x[r]
            yr = y[r]
            for j in range(w_):
                yr[j] = (xr[j] - hi[j]) * scale[j] + shift[j]


@numba.njit(cache=True, error_model="numpy", nogil=True)
def predict_rows(
    x, groups, run, nblk, batch_stats, running_mean, running_var, eps, gamma, beta, y
):  # pragma: no cover - compiled
    """Prediction on (R, W) rows (as ``forward_rows``: W = groups * C, run 1) from the running
    statistics in one call: ``running_vectors``, then ``forward_rows`` with the statistics
    given (scale as its gamma, invstd 1; ``batch_stats`` False). The caller passes ``run``
    and ``batch_stats`` so that ``forward_rows`` is called with the argument types a training
    call has: the same compiled code, no second specialization to compile. The bits of the
    NumPy vectors and the ``forward_rows`` call it replaces (ten NumPy calls, 60-100 us right
    after another layer's work has gone through the caches)."""
    mean, scale, shift = running_vectors(running_mean, running_var, eps, gamma, beta)
    ones = np.ones(mean.shape[0])
    forward_rows(x, groups, run, nblk, batch_stats, scale, shift, eps, y, mean, ones, ones)


_forward_rows_serial = forward_rows.serial


@numba.njit(cache=True, error_model="numpy", nogil=True)
def predict_rows_serial(
    x, groups, run, nblk, batch_stats, running_mean, running_var, eps, gamma, beta, y
):  # pragma: no cover - compiled
    """``predict_rows`` on ``forward_rows``' single-threaded twin."""
    mean, scale, shift = running_vectors(running_mean, running_var, eps, gamma, beta)
    ones = np.ones(mean.shape[0])
    _forward_rows_serial(x, groups, run, nblk, batch_stats, scale, shift, eps, y, mean, ones, ones)


predict_rows.serial = predict_rows_serial
