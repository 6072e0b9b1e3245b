"""Numba kernels: batch norm fused with an activation, ``y = act(gamma * x_hat + beta)``.

Two canonical layouts, as for the plain BN kernels:

* ``ncs``: ``(N, C, S)`` with S contiguous (NCHW, NCL): work is split over the ``N * C`` rows.
* ``rc``:  ``(R, C)`` with C contiguous ((N, C) inputs and channels-last): work is split over
  blocks of rows, each accumulating a vector of C channels (the inner loop runs across
  channels, which vectorizes without reassociating any sum).

Activation codes (``act``): 0 identity, 1 relu, 2 leaky_relu (``slope``), 3 silu.
With ``z = gamma * x_hat + beta`` (pre-activation)::

    forward:   y  = act(z)
    backward:  dz = dy * act'(z)
               dx = gamma * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))
               dgamma = sum(dz * x_hat),  dbeta = sum(dz)

Numerical choices, made here:

* Statistics as the plain BN computes them: ``ncs`` training forward fused per block of
  channels (``forward_act_cf``: the plain ``forward_train_cf`` with the activation in
  its output pass, one float64 pass about a shift), or the plain BN's ``stats_cf`` where
  blocks do not fit; ``rc`` per row block (the one-pass float32 sums about a shift with
  their exact fallback, ``stats._stats_block``), merged with Chan's pairwise formula
  ``M2 = sum M2_b + sum n_b (mean_b - mean)^2``. No cancellation happens for large offsets
  (E[x^2] - E[x]^2 loses all digits at mean 1e4, std 1 in float32).
* The output and backward loops in x's dtype run with the mean split in two
  (``((x - mean_hi) - mean_lo) * invstd``, ``x - mean_hi`` exact near the mean) and the
  ``rc`` sums in 32-row float32 partials added to float64, as the plain BN's kernels.
* Compiled with the package's shared choices (``kernels/_jit.py``): cached, ``reassoc`` so the
  float64 row sums vectorize, no ``nnan``/``ninf`` so NaN and inf propagate as in torch; each
  parallel kernel has a ``.serial`` twin that the dispatch runs on small inputs.
* The activation's branch (``act``, ``from_output``) is taken *outside* the inner loops of the
  (R, C) kernels: each loop calls ``_act``/``_act_grad`` with a constant code, so
  it compiles branch-free and vectorizes across channels. With the branch per element the
  (256, 1024) float32 backward took 0.83 ms against the plain BN's 0.11 ms (2 cores, shared
  machine). The ``ncs`` forward kernels branch once per row or range of rows; the ``ncs``
  backward helpers (``_sums_seg``, ``_dx_seg``) once per row.
* Small (R, C) inputs (one thread, under ``_BLOCK_BYTES``) run ``forward_train_act_rows``:
  statistics and output in one call, since there the fixed cost per call is the point; every
  (R, C) backward is one call (``backward_rc``).
* ``from_output=True`` (save_memory): only ``y`` is kept; ``z = act^-1(y)`` (identity,
  leaky_relu with slope > 0) and ``x_hat = (z - beta) / gamma`` (gamma != 0, checked by the
  module). This is the InPlace-ABN recovery.

Kernels validate nothing; ``_act_dispatch`` checks layouts, dtypes and values.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

from batchnorm.kernels._jit import ELEMENTWISE, FASTMATH, elementwise_kernel, parallel_kernel, serial_kernel
from batchnorm.kernels.forward import channel_block_stats, running_vectors
from batchnorm.kernels.stats import _stats_block

IDENTITY, RELU, LEAKY_RELU, SILU = 0, 1, 2, 3


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _act(z, code, slope, one, zero):
    """y = act(z); ``one``/``zero`` in the arithmetic's dtype (float64 literals would promote float32)."""
    if code == RELU:
        return z if z > zero else zero
    if code == LEAKY_RELU:
        return z if z > zero else z * slope
    if code == SILU:
        return z / (one + math.exp(-z))
    return z


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _act_grad(z, code, slope, one, zero):
    """d act / dz at z (relu's derivative at 0 is 0, as in torch); constants as in ``_act``."""
    if code == RELU:
        return one if z > zero else zero
    if code == LEAKY_RELU:
        return one if z > zero else slope
    if code == SILU:
        s = one / (one + math.exp(-z))
        return s * (one + z * (one - s))
    return one


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _xhat(v, hi, lo, istd, g, bt, code, slope, from_output, zero):
    """x_hat of one saved value in its dtype: ``((x - mean_hi) - mean_lo) invstd`` (``x - mean_hi``
    exact near the mean), or from y ``(act^-1(y) - beta) / gamma``."""
    if from_output:
        z = v / slope if code == LEAKY_RELU and v <= zero else v
        return (z - bt) / g
    return ((v - hi) - lo) * istd


@parallel_kernel
def block_stats_rc(x, starts, block_mean, block_m2):
    """Per block of rows [starts[b], starts[b+1]): per-channel mean and centred sum of squares,
    by the plain BN's one-pass shifted float32 block statistics with its exact fallback
    (``stats._stats_block``). (4096, 256) float32, one thread: ~2x faster than the two
    float64 passes it replaced."""
    for b in prange(starts.shape[0] - 1):
        _stats_block(x, starts[b], starts[b + 1], block_mean[b], block_m2[b])


@numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def combine_stats(part_mean, part_m2, counts, mean, var):
    """Chan's merge of equal-or-unequal blocks: writes the biased var over sum(counts)."""
    n_parts, channels = part_mean.shape
    total = 0.0
    for p in range(n_parts):
        total += counts[p]
    for c in range(channels):
        m = 0.0
        for p in range(n_parts):
            m += counts[p] * part_mean[p, c]
        m /= total
        m2 = 0.0
        for p in range(n_parts):
            d = part_mean[p, c] - m
            m2 += part_m2[p, c] + counts[p] * d * d
        mean[c] = m
        var[c] = m2 / total


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _normalize_act_runs_code(x, q0, q1, hi, lo, scale, beta, code, slope, one, zero, y):
    c_ = x.shape[1]
    n = q0 // c_
    c = q0 % c_
    for _ in range(q0, q1):
        xr = x[n, c]
        yr = y[n, c]
        m_hi, m_lo, a, t = hi[c], lo[c], scale[c], beta[c]
        for i in range(xr.shape[0]):
            yr[i] = _act(((xr[i] - m_hi) - m_lo) * a + t, code, slope, one, zero)
        c += 1
        if c == c_:
            c = 0
            n += 1


@elementwise_kernel
def normalize_act_ncs(x, mean, scale, beta, act, slope, nblk, y):  # pragma: no cover - compiled
    """x, y: (N, C, S): ``y = act(((x - mean_hi) - mean_lo) scale + beta)`` in x's dtype, the
    two-part mean of the plain BN's ``normalize_cf`` (compiled without ``reassoc``, which
    would fold the two parts back into one: a 0.04 error at mean 1e4, std 1e-2, tested).

    The N * C rows go in ``nblk`` contiguous ranges with the channel stepped along, the
    branch on act once per range. It was ``act(x * scale + shift)`` with
    ``shift = beta - mean * scale`` (``x * scale`` rounds at large offsets) per row, the
    row's n and channel divided out of its index.
    """
    hi, lo, sc, bt, _, sl, one, zero = _typed(x, mean, scale, beta, beta, slope)
    r_ = x.shape[0] * x.shape[1]
    for b in prange(nblk):
        q0 = b * r_ // nblk
        q1 = (b + 1) * r_ // nblk
        if act == RELU:
            _normalize_act_runs_code(x, q0, q1, hi, lo, sc, bt, RELU, sl, one, zero, y)
        elif act == LEAKY_RELU:
            _normalize_act_runs_code(x, q0, q1, hi, lo, sc, bt, LEAKY_RELU, sl, one, zero, y)
        elif act == SILU:
            _normalize_act_runs_code(x, q0, q1, hi, lo, sc, bt, SILU, sl, one, zero, y)
        else:
            _normalize_act_runs_code(x, q0, q1, hi, lo, sc, bt, IDENTITY, sl, one, zero, y)


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _act_run_code(xr, yr, mu, scale, shift, code, slope):
    for i in range(xr.shape[0]):
        yr[i] = _act((xr[i] - mu) * scale + shift, code, slope, 1.0, 0.0)


@parallel_kernel
def forward_act_cf(
    x, nb, batch_stats, gamma, beta, eps, act, slope, y, mean, var, invstd
):  # pragma: no cover - compiled
    """x, y: (N, C, S); per block of ``nb`` consecutive channels: with ``batch_stats``, the
    block's statistics in one pass about a shift (``forward.channel_block_stats``, writing
    mean, var and invstd), else mean and invstd as given (prediction); then
    ``y = act((x - mean) invstd gamma + beta)`` in float64 while the block is in cache.

    Training: the plain BN's fused ``forward_train_cf`` with the activation in its output
    pass, 1 read + 1 write of x's size instead of 3 reads + 1 write: kernels
    forward_train_act, relu, 2 threads, interleaved: (16, 2048, 7, 7) 1.13-1.25 ->
    0.67-0.76 ms, (16, 256, 56, 56) 5.86 -> 4.39 ms. Prediction runs the same compiled code
    (one kernel to compile for an (N, C, S) BatchNormAct: a second one cost 3-4 s of its
    first call). The branch on act is taken per row, outside the element loop.
    """
    n_, c_, _ = x.shape
    for b in prange(nb):
        c0 = b * c_ // nb
        c1 = (b + 1) * c_ // nb
        if batch_stats:
            channel_block_stats(x, c0, c1, eps, mean, var, invstd)
        for n in range(n_):
            for c in range(c0, c1):
                mu, scale, shift = mean[c], invstd[c] * gamma[c], beta[c]
                if act == RELU:
                    _act_run_code(x[n, c], y[n, c], mu, scale, shift, RELU, slope)
                elif act == LEAKY_RELU:
                    _act_run_code(x[n, c], y[n, c], mu, scale, shift, LEAKY_RELU, slope)
                elif act == SILU:
                    _act_run_code(x[n, c], y[n, c], mu, scale, shift, SILU, slope)
                else:
                    _act_run_code(x[n, c], y[n, c], mu, scale, shift, IDENTITY, slope)


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _normalize_act_code(x, r0, r1, hi, lo, scale, beta, code, slope, one, zero, y):
    for r in range(r0, r1):
        xr = x[r]
        yr = y[r]
        for c in range(xr.shape[0]):
            yr[c] = _act(((xr[c] - hi[c]) - lo[c]) * scale[c] + beta[c], code, slope, one, zero)


@numba.njit(cache=True, fastmath=ELEMENTWISE, error_model="numpy", nogil=True)
def _normalize_act_rows(x, r0, r1, mean, scale, beta, act, slope, y):
    """y = act(((x - mean_hi) - mean_lo) scale + beta) over rows [r0, r1), in x's dtype (the
    two-part mean as in the plain BN's ``normalize_rows``), the branch on act once per block."""
    hi, lo, sc, bt, _, sl, one, zero = _typed(x, mean, scale, beta, beta, slope)
    if act == RELU:
        _normalize_act_code(x, r0, r1, hi, lo, sc, bt, RELU, sl, one, zero, y)
    elif act == LEAKY_RELU:
        _normalize_act_code(x, r0, r1, hi, lo, sc, bt, LEAKY_RELU, sl, one, zero, y)
    elif act == SILU:
        _normalize_act_code(x, r0, r1, hi, lo, sc, bt, SILU, sl, one, zero, y)
    else:
        _normalize_act_code(x, r0, r1, hi, lo, sc, bt, IDENTITY, sl, one, zero, y)


@numba.njit(cache=True, fastmath=ELEMENTWISE, error_model="numpy", nogil=True)
def normalize_act_running_rows(
    x, running_mean, running_var, eps, gamma, beta, act, slope, y
):  # pragma: no cover - compiled
    """Prediction on small (R, C) rows from the running statistics, one thread, one block::

        mean = running_mean,  scale = gamma / sqrt(running_var + eps),  shift = beta

    formed here in float64 (gamma, beta: (C,) or None), then ``_normalize_act_rows``, the code
    ``normalize_act_rc`` runs per block: the same bits as the general path, without its
    Python set-up. (64, 16) BatchNormAct1d eval module call, interleaved: 29.8 -> 21.7 us
    (torch BatchNorm1d + ReLU: 23.9 us).
    """
    mean, scale, shift = running_vectors(running_mean, running_var, eps, gamma, beta)
    _normalize_act_rows(x, 0, x.shape[0], mean, scale, shift, act, slope, y)


@parallel_kernel
def normalize_act_rc(x, mean, scale, beta, act, slope, starts, y):
    """y = act((x - mean) * scale + beta) per block of rows, scale = gamma * invstd."""
    for b in prange(starts.shape[0] - 1):
        _normalize_act_rows(x, starts[b], starts[b + 1], mean, scale, beta, act, slope, y)


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _sums_seg_code(dy, v, mu, istd, g, bt, code, slope, from_output):
    s_dz = 0.0
    s_dz_xhat = 0.0
    for i in range(v.shape[0]):
        x_hat = _xhat(v[i], mu, 0.0, istd, g, bt, code, slope, from_output, 0.0)
        dz = dy[i] * _act_grad(g * x_hat + bt, code, slope, 1.0, 0.0)
        s_dz += dz
        s_dz_xhat += dz * x_hat
    return s_dz, s_dz_xhat


@numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def _sums_seg(dy, v, mu, istd, g, bt, act, slope, from_output):
    """``(sum dz, sum dz x_hat)`` along one (n, c) row of S values, ``dz = dy act'(z)``.

    The branch on (act, from_output) is taken once per row; each loop below is compiled with
    constants and vectorizes (a per-element branch made the single-threaded (16, 64, 56, 56)
    float32 backward 30 ms against the plain BN's 2.3 ms). Accumulated in float64."""
    if from_output:
        if act == LEAKY_RELU:
            return _sums_seg_code(dy, v, mu, istd, g, bt, LEAKY_RELU, slope, True)
        return _sums_seg_code(dy, v, mu, istd, g, bt, IDENTITY, slope, True)
    if act == RELU:
        return _sums_seg_code(dy, v, mu, istd, g, bt, RELU, slope, False)
    if act == LEAKY_RELU:
        return _sums_seg_code(dy, v, mu, istd, g, bt, LEAKY_RELU, slope, False)
    if act == SILU:
        return _sums_seg_code(dy, v, mu, istd, g, bt, SILU, slope, False)
    return _sums_seg_code(dy, v, mu, istd, g, bt, IDENTITY, slope, False)


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _dx_seg_code(dy, v, mu, istd, g, bt, code, slope, from_output, m_dz, m_dzx, dx):
    k = g * istd
    for i in range(v.shape[0]):
        x_hat = _xhat(v[i], mu, 0.0, istd, g, bt, code, slope, from_output, 0.0)
        dz = dy[i] * _act_grad(g * x_hat + bt, code, slope, 1.0, 0.0)
        dx[i] = k * (dz - m_dz - x_hat * m_dzx)


@numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def _dx_seg(dy, v, mu, istd, g, bt, act, slope, from_output, m_dz, m_dzx, dx):
    """``dx = gamma invstd (dz - mean(dz) - x_hat mean(dz x_hat))`` along one (n, c) row,
    branch hoisted as in ``_sums_seg``."""
    if from_output:
        if act == LEAKY_RELU:
            _dx_seg_code(dy, v, mu, istd, g, bt, LEAKY_RELU, slope, True, m_dz, m_dzx, dx)
        else:
            _dx_seg_code(dy, v, mu, istd, g, bt, IDENTITY, slope, True, m_dz, m_dzx, dx)
    elif act == RELU:
        _dx_seg_code(dy, v, mu, istd, g, bt, RELU, slope, False, m_dz, m_dzx, dx)
    elif act == LEAKY_RELU:
        _dx_seg_code(dy, v, mu, istd, g, bt, LEAKY_RELU, slope, False, m_dz, m_dzx, dx)
    elif act == SILU:
        _dx_seg_code(dy, v, mu, istd, g, bt, SILU, slope, False, m_dz, m_dzx, dx)
    else:
        _dx_seg_code(dy, v, mu, istd, g, bt, IDENTITY, slope, False, m_dz, m_dzx, dx)


@parallel_kernel
def backward_reduce_ncs(dy, v, mean, invstd, gamma, beta, act, slope, from_output, p_dz, p_dz_xhat):
    """Per (n, c) row, in memory order: sum(dz) and sum(dz * x_hat); ``v`` is x, or y when
    ``from_output``."""
    n_rows, channels, size = dy.shape
    for r in prange(n_rows * channels):
        n, c = r // channels, r % channels
        p_dz[n, c], p_dz_xhat[n, c] = _sums_seg(
            dy[n, c], v[n, c], mean[c], invstd[c], gamma[c], beta[c], act, slope, from_output
        )


@parallel_kernel
def backward_dx_ncs(dy, v, mean, invstd, gamma, beta, act, slope, from_output, mean_dz, mean_dz_xhat, dx):
    """dx = gamma * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat)), rows in memory order."""
    n_rows, channels, size = dy.shape
    for r in prange(n_rows * channels):
        n, c = r // channels, r % channels
        _dx_seg(
            dy[n, c],
            v[n, c],
            mean[c],
            invstd[c],
            gamma[c],
            beta[c],
            act,
            slope,
            from_output,
            mean_dz[c],
            mean_dz_xhat[c],
            dx[n, c],
        )


# Rows backward: SUB rows summed in x's dtype before one float64 update (as the plain BN's
# ``backward._reduce_block``).
SUB = 32


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _sums_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, code, slope, from_output, one, zero, s_dz, s_dz_xhat):
    c_ = v.shape[1]
    t1 = np.empty(c_, v.dtype)
    t2 = np.empty(c_, v.dtype)
    for s in range(r0, r1, SUB):
        for c in range(c_):
            t1[c] = zero
            t2[c] = zero
        for r in range(s, min(s + SUB, r1)):
            vr = v[r]
            gr = dy[r]
            for c in range(c_):
                x_hat = _xhat(vr[c], hi[c], lo[c], istd[c], g[c], bt[c], code, slope, from_output, zero)
                dz = gr[c] * _act_grad(g[c] * x_hat + bt[c], code, slope, one, zero)
                t1[c] += dz
                t2[c] += dz * x_hat
        for c in range(c_):
            s_dz[c] += t1[c]
            s_dz_xhat[c] += t2[c]


@numba.njit(cache=True, fastmath=ELEMENTWISE, error_model="numpy", nogil=True)
def _typed(v, mean, invstd, gamma, beta, slope):
    """The per-channel vectors in v's dtype (mean as hi + lo), and slope, 1 and 0 as scalars."""
    c_ = v.shape[1]
    hi = np.empty(c_, v.dtype)
    lo = np.empty(c_, v.dtype)
    istd = np.empty(c_, v.dtype)
    g = np.empty(c_, v.dtype)
    bt = np.empty(c_, v.dtype)
    for c in range(c_):
        hi[c] = mean[c]
        lo[c] = mean[c] - hi[c]
        istd[c] = invstd[c]
        g[c] = gamma[c]
        bt[c] = beta[c]
    consts = np.empty(3, v.dtype)
    consts[0] = slope
    consts[1] = 1.0
    consts[2] = 0.0
    return hi, lo, istd, g, bt, consts[0], consts[1], consts[2]


@numba.njit(cache=True, fastmath=ELEMENTWISE, error_model="numpy", nogil=True)
def _sums_rows(dy, v, r0, r1, mean, invstd, gamma, beta, act, slope, from_output, s_dz, s_dz_xhat):
    """Adds ``dz`` and ``dz x_hat`` of rows [r0, r1) to the (C,) float64 ``s_dz``, ``s_dz_xhat``.

    One loop across channels per row, in x's dtype, SUB rows per float64 update; the branch on
    (act, from_output) taken once per block (the ``_code`` variants compile with constants
    and vectorize). relu, float32, one thread, minimum of 51: (256, 1024) 222 -> 98 us, and
    ``_dx_rows`` 293 -> 107 us; (50176, 64) 3.7 -> 0.9 ms and 3.8 -> 1.3 ms (x_hat and dz
    went through (C,) float64 scratch rows, three loops per row, before). The sums differ
    from float64 accumulation by ~1e-7 relative.
    """
    hi, lo, istd, g, bt, sl, one, zero = _typed(v, mean, invstd, gamma, beta, slope)
    if from_output:
        if act == LEAKY_RELU:
            _sums_rows_code(
                dy, v, r0, r1, hi, lo, istd, g, bt, LEAKY_RELU, sl, True, one, zero, s_dz, s_dz_xhat
            )
        else:
            _sums_rows_code(
                dy, v, r0, r1, hi, lo, istd, g, bt, IDENTITY, sl, True, one, zero, s_dz, s_dz_xhat
            )
    elif act == RELU:
        _sums_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, RELU, sl, False, one, zero, s_dz, s_dz_xhat)
    elif act == LEAKY_RELU:
        _sums_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, LEAKY_RELU, sl, False, one, zero, s_dz, s_dz_xhat)
    elif act == SILU:
        _sums_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, SILU, sl, False, one, zero, s_dz, s_dz_xhat)
    else:
        _sums_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, IDENTITY, sl, False, one, zero, s_dz, s_dz_xhat)


@numba.njit(inline="always", cache=True, fastmath=ELEMENTWISE, error_model="numpy")
def _dx_rows_code(
    dy, v, r0, r1, hi, lo, istd, g, bt, code, slope, from_output, one, zero, k, m_dz, m_dzx, dx
):
    for r in range(r0, r1):
        vr = v[r]
        gr = dy[r]
        dr = dx[r]
        for c in range(vr.shape[0]):
            x_hat = _xhat(vr[c], hi[c], lo[c], istd[c], g[c], bt[c], code, slope, from_output, zero)
            dz = gr[c] * _act_grad(g[c] * x_hat + bt[c], code, slope, one, zero)
            dr[c] = k[c] * (dz - m_dz[c] - x_hat * m_dzx[c])


@numba.njit(cache=True, fastmath=ELEMENTWISE, error_model="numpy", nogil=True)
def _dx_rows(dy, v, r0, r1, mean, invstd, gamma, beta, act, slope, from_output, mean_dz, mean_dz_xhat, dx):
    """dx of rows [r0, r1) in x's dtype, ``mean_dz``/``mean_dz_xhat`` the (C,) float64 means of
    dz and dz x_hat; branch hoisted as in ``_sums_rows``."""
    hi, lo, istd, g, bt, sl, one, zero = _typed(v, mean, invstd, gamma, beta, slope)
    c_ = v.shape[1]
    k = np.empty(c_, v.dtype)
    m_dz = np.empty(c_, v.dtype)
    m_dzx = np.empty(c_, v.dtype)
    for c in range(c_):
        k[c] = gamma[c] * invstd[c]
        m_dz[c] = mean_dz[c]
        m_dzx[c] = mean_dz_xhat[c]
    if from_output:
        if act == LEAKY_RELU:
            _dx_rows_code(
                dy, v, r0, r1, hi, lo, istd, g, bt, LEAKY_RELU, sl, True, one, zero, k, m_dz, m_dzx, dx
            )
        else:
            _dx_rows_code(
                dy, v, r0, r1, hi, lo, istd, g, bt, IDENTITY, sl, True, one, zero, k, m_dz, m_dzx, dx
            )
    elif act == RELU:
        _dx_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, RELU, sl, False, one, zero, k, m_dz, m_dzx, dx)
    elif act == LEAKY_RELU:
        _dx_rows_code(
            dy, v, r0, r1, hi, lo, istd, g, bt, LEAKY_RELU, sl, False, one, zero, k, m_dz, m_dzx, dx
        )
    elif act == SILU:
        _dx_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, SILU, sl, False, one, zero, k, m_dz, m_dzx, dx)
    else:
        _dx_rows_code(dy, v, r0, r1, hi, lo, istd, g, bt, IDENTITY, sl, False, one, zero, k, m_dz, m_dzx, dx)


@numba.njit(cache=True, fastmath=ELEMENTWISE, error_model="numpy", nogil=True)
def _block_sums(dy, v, starts, b, mean, invstd, gamma, beta, act, slope, from_output, p_dz, p_dz_xhat):
    """Row block b's sums into row b of the partial sums (zeroed first)."""
    p_dz[b, :] = 0.0
    p_dz_xhat[b, :] = 0.0
    r0, r1 = starts[b], starts[b + 1]
    _sums_rows(dy, v, r0, r1, mean, invstd, gamma, beta, act, slope, from_output, p_dz[b], p_dz_xhat[b])


@parallel_kernel
def backward_reduce_rc(dy, v, mean, invstd, gamma, beta, act, slope, from_output, starts, p_dz, p_dz_xhat):
    """Per row block: sum(dz), sum(dz * x_hat) into the block's row of the partial sums."""
    for b in prange(starts.shape[0] - 1):
        _block_sums(dy, v, starts, b, mean, invstd, gamma, beta, act, slope, from_output, p_dz, p_dz_xhat)


@parallel_kernel
def backward_dx_rc(
    dy, v, mean, invstd, gamma, beta, act, slope, from_output, mean_dz, mean_dz_xhat, starts, dx
):
    for b in prange(starts.shape[0] - 1):
        r0, r1 = starts[b], starts[b + 1]
        _dx_rows(dy, v, r0, r1, mean, invstd, gamma, beta, act, slope, from_output, mean_dz, mean_dz_xhat, dx)


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _act_loop(z, code, slope, y):
    for r in range(z.shape[0]):
        for c in range(z.shape[1]):
            y[r, c] = _act(z[r, c], code, slope, 1.0, 0.0)


@numba.njit(cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def _act_rows(z, act, slope, y):
    """y = act(z) on (R, C), with the branch on ``act`` outside the loops: each loop then
    calls ``_act`` with a constant code, so it compiles branch-free and vectorizes (a branch
    per element measured 10 ns/element on (64, 16); the hoisted loops ~1)."""
    if act == RELU:
        _act_loop(z, RELU, slope, y)
    elif act == LEAKY_RELU:
        _act_loop(z, LEAKY_RELU, slope, y)
    elif act == SILU:
        _act_loop(z, SILU, slope, y)
    else:
        _act_loop(z, IDENTITY, slope, y)


@serial_kernel
def forward_train_act_rows(x, gamma, beta, eps, act, slope, y, mean, var, invstd):
    """x, y: (R, C) small enough for L2: statistics and output in one call, one thread.

    For small inputs the fixed cost is the point: one kernel call instead of block_stats_rc,
    combine_stats and normalize_act_rc and the NumPy arithmetic between them
    ((64, 16) float32 forward_train: 16.5 -> 7 us measured here). z is kept in float64 so
    the activation sees the same value as in the large-input kernels.
    """
    rows, channels = x.shape
    scale = np.empty(channels)
    z = np.empty((rows, channels))
    for c in range(channels):
        mean[c] = 0.0
        var[c] = 0.0
    for r in range(rows):
        for c in range(channels):
            mean[c] += x[r, c]
    for c in range(channels):
        mean[c] /= rows
    for r in range(rows):
        for c in range(channels):
            d = x[r, c] - mean[c]
            var[c] += d * d
    for c in range(channels):
        var[c] /= rows
        invstd[c] = 1.0 / math.sqrt(var[c] + eps)
        scale[c] = invstd[c] * gamma[c]
    for r in range(rows):
        for c in range(channels):
            z[r, c] = (x[r, c] - mean[c]) * scale[c] + beta[c]
    _act_rows(z, act, slope, y)


@parallel_kernel
def backward_rc(
    dy,
    v,
    mean,
    invstd,
    gamma,
    beta,
    act,
    slope,
    from_output,
    starts,
    p_dz,
    p_dz_xhat,
    dx,
    sum_dz,
    sum_dz_xhat,
):
    """dy, v, dx: (R, C); the whole backward in one call: each row block's sums
    (``_sums_rows``), their total per channel, then each block's dx (``_dx_rows``). One call
    instead of two kernels and the NumPy arithmetic between them ((256, 1024) float32,
    2 threads: module backward 250 -> 230 us, one run on a noisy machine)."""
    rows, channels = v.shape
    n_blocks = starts.shape[0] - 1
    for b in prange(n_blocks):
        _block_sums(dy, v, starts, b, mean, invstd, gamma, beta, act, slope, from_output, p_dz, p_dz_xhat)
    m_dz = np.zeros(channels)
    m_dzx = np.zeros(channels)
    for b in range(n_blocks):
        for c in range(channels):
            m_dz[c] += p_dz[b, c]
            m_dzx[c] += p_dz_xhat[b, c]
    for c in range(channels):
        sum_dz[c] = m_dz[c]
        sum_dz_xhat[c] = m_dzx[c]
        m_dz[c] /= rows
        m_dzx[c] /= rows
    for b in prange(n_blocks):
        r0, r1 = starts[b], starts[b + 1]
        _dx_rows(dy, v, r0, r1, mean, invstd, gamma, beta, act, slope, from_output, m_dz, m_dzx, dx)


@parallel_kernel
def backward_cf(dy, v, nb, mean, invstd, gamma, beta, act, slope, from_output, dx, sum_dz, sum_dz_xhat):
    """The whole backward over ``nb`` blocks of consecutive channels, as the plain BN's
    ``backward.backward_cf``: a block's sums over every n, then its dx while the block's dy and
    v slabs are still in cache (2 reads + 1 write instead of 4 + 1), each pass in memory order.
    (16, 2048, 7, 7) float32, 2 threads, kernels.backward_act: 3.5 -> 1.1 ms (per-channel
    units over (N, S) slabs with float64 scratch rows before)."""
    n_rows, channels, size = dy.shape
    count = n_rows * size
    for b in prange(nb):
        c0 = b * channels // nb
        c1 = (b + 1) * channels // nb
        for c in range(c0, c1):
            sum_dz[c] = 0.0
            sum_dz_xhat[c] = 0.0
        for n in range(n_rows):
            for c in range(c0, c1):
                s_dz, s_dzx = _sums_seg(
                    dy[n, c], v[n, c], mean[c], invstd[c], gamma[c], beta[c], act, slope, from_output
                )
                sum_dz[c] += s_dz
                sum_dz_xhat[c] += s_dzx
        for n in range(n_rows):
            for c in range(c0, c1):
                _dx_seg(
                    dy[n, c],
                    v[n, c],
                    mean[c],
                    invstd[c],
                    gamma[c],
                    beta[c],
                    act,
                    slope,
                    from_output,
                    sum_dz[c] / count,
                    sum_dz_xhat[c] / count,
                    dx[n, c],
                )
