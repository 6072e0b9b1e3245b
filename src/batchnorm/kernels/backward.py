"""Backward kernels: ``reference.backward_compact`` in two passes over (x, dy)::

    sum_dy      = sum_i dy_i                                  (= dbeta)
    sum_dy_xhat = invstd * sum_i dy_i (x_i - mean)            (= dgamma)
    dx_i        = gamma invstd (dy_i - sum_dy/m - x_hat_i sum_dy_xhat/m)

The reduction accumulates in float64; ``x - mean`` is formed per element (not
``sum(dy x) - mean sum(dy)``, which cancels for large offsets). Layouts as in ``stats``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from batchnorm.kernels._jit import ELEMENTWISE, FASTMATH, elementwise_kernel, parallel_kernel


@parallel_kernel
def backward_cf(dy, x, nb, mean, invstd, gamma, dx, sum_dy, sum_dy_xhat):  # pragma: no cover - compiled
    """dy, x, dx: (N, C, S); ``nb`` blocks of consecutive channels, the dx pass from cache.

    Fused and walked in memory order like ``forward_train_cf``: 2 reads + 1 write instead of
    4 reads + 1 write, long sequential runs. (16, 512, 28, 28) float32, one thread, reused
    out (minimum of repeats, shared machine): 8.2 -> 5.3 ms (per-channel units before).

    The dx pass runs in x's dtype, ``dx = a dy + b (x - mean_hi) + c`` with the float64 mean
    split as in ``normalize_cf`` (``x - mean_hi`` exact near the mean, ``mean_lo`` folded into
    c): twice the vector width of float64, and short maps pay their per-run loop overhead on
    half the instructions. Raw kernel, float32, 2 threads, in a loop (medians of 31 x 5):
    (16, 2048, 7, 7) 564 -> 443 us, (16, 1024, 14, 14) 1211 -> 1052 us, (16, 512, 28, 28)
    unchanged; dx within 1.3e-7 of its largest value (was 4e-8) at mean 1e4, std 1e-2.
    """
    n_, c_, s_ = x.shape
    m = n_ * s_
    for b in prange(nb):
        c0 = b * c_ // nb
        c1 = (b + 1) * c_ // nb
        for c in range(c0, c1):
            sum_dy[c] = 0.0
            sum_dy_xhat[c] = 0.0
        for n in range(n_):
            for c in range(c0, c1):
                xr = x[n, c]
                gr = dy[n, c]
                mu = mean[c]
                s1 = 0.0
                s2 = 0.0
                for i in range(s_):
                    s1 += gr[i]
                    s2 += gr[i] * (xr[i] - mu)
                sum_dy[c] += s1
                sum_dy_xhat[c] += s2
        for c in range(c0, c1):
            sum_dy_xhat[c] *= invstd[c]
        for n in range(n_):
            for c in range(c0, c1):
                xr = x[n, c]
                gr = dy[n, c]
                dr = dx[n, c]
                mu = mean[c]
                inv = invstd[c]
                a = gamma[c] * inv  # gamma invstd
                mdy = sum_dy[c] / m  # mean(dy)
                k = sum_dy_xhat[c] / m * inv  # mean(dy x_hat) * invstd, multiplies (x - mean)
                # dx = a dy - a k (x - mu_hi) + a (k mu_lo - mdy), in x's dtype
                hi = xr.dtype.type(mu)
                a_x = xr.dtype.type(a)
                b_x = xr.dtype.type(-a * k)
                c_x = xr.dtype.type(a * (k * (mu - hi) - mdy))
                for i in range(s_):
                    dr[i] = a_x * gr[i] + b_x * (xr[i] - hi) + c_x


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def _reduce_cf(dy, x, c_, mean, invstd, seg, nblk, sum_dy, sum_dy_xhat):  # pragma: no cover - compiled
    """``backward_reduce_cf``'s loops, inlined where they are called (its prange included)."""
    r_, s_ = x.shape
    n_ = r_ // c_
    units = r_ * seg
    part = np.empty((2, units))
    if seg == 1:
        for b in prange(nblk):
            q0 = b * r_ // nblk
            c = q0 % c_
            for q in range(q0, (b + 1) * r_ // nblk):
                xr = x[q]
                gr = dy[q]
                mu = mean[c]
                s1 = 0.0
                s2 = 0.0
                for i in range(s_):
                    s1 += gr[i]
                    s2 += gr[i] * (xr[i] - mu)
                part[0, q] = s1
                part[1, q] = s2
                c = c + 1 if c + 1 < c_ else 0
    else:
        for u in prange(units):
            q = u // seg
            p = u % seg
            xr = x[q, p * s_ // seg : (p + 1) * s_ // seg]
            gr = dy[q, p * s_ // seg : (p + 1) * s_ // seg]
            mu = mean[q % c_]
            s1 = 0.0
            s2 = 0.0
            for i in range(xr.shape[0]):
                s1 += gr[i]
                s2 += gr[i] * (xr[i] - mu)
            part[0, u] = s1
            part[1, u] = s2
    for c in range(c_):
        sum_dy[c] = 0.0
        sum_dy_xhat[c] = 0.0
    for n in range(n_):
        for c in range(c_):
            u0 = (n * c_ + c) * seg
            for p in range(seg):
                sum_dy[c] += part[0, u0 + p]
                sum_dy_xhat[c] += part[1, u0 + p]
    for c in range(c_):
        sum_dy_xhat[c] *= invstd[c]


@parallel_kernel
def backward_reduce_cf(
    dy, x, c_, mean, invstd, seg, nblk, sum_dy, sum_dy_xhat
):  # pragma: no cover - compiled
    """dy, x: (N*C, S), row q of channel q % C; rows split into ``seg`` pieces, units in
    memory order (as ``stats_cf``), the per-unit sums added per channel afterwards. Whole
    rows (``seg == 1``) go in ``nblk`` contiguous ranges, the channel stepped along rather
    than divided out (see ``normalize_cf``)."""
    _reduce_cf(dy, x, c_, mean, invstd, seg, nblk, sum_dy, sum_dy_xhat)


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy", nogil=True)
def _dx_cf(dy, x, c_, mean, a, mdy, k, seg, nblk, dx):  # pragma: no cover - compiled
    """``backward_dx_cf``'s loops, inlined where they are called (its prange included)."""
    r_, s_ = x.shape
    if seg == 1:
        for b in prange(nblk):
            q0 = b * r_ // nblk
            c = q0 % c_
            for q in range(q0, (b + 1) * r_ // nblk):
                xr = x[q]
                gr = dy[q]
                dr = dx[q]
                mu = mean[c]
                ac = a[c]
                mc = mdy[c]
                kc = k[c]
                for i in range(s_):
                    dr[i] = ac * (gr[i] - mc - (xr[i] - mu) * kc)
                c = c + 1 if c + 1 < c_ else 0
    else:
        for u in prange(r_ * seg):
            q = u // seg
            p = u % seg
            c = q % c_
            i0 = p * s_ // seg
            i1 = (p + 1) * s_ // seg
            xr = x[q, i0:i1]
            gr = dy[q, i0:i1]
            dr = dx[q, i0:i1]
            mu = mean[c]
            ac = a[c]
            mc = mdy[c]
            kc = k[c]
            for i in range(xr.shape[0]):
                dr[i] = ac * (gr[i] - mc - (xr[i] - mu) * kc)


@parallel_kernel
def backward_dx_cf(dy, x, c_, mean, a, mdy, k, seg, nblk, dx):  # pragma: no cover - compiled
    """dx = a (dy - mdy - (x - mean) k) with a = gamma invstd, k = mean(dy x_hat) invstd.

    dy, x, dx: (N*C, S), units in memory order and whole rows in ``nblk`` ranges, as
    ``normalize_cf``.
    """
    _dx_cf(dy, x, c_, mean, a, mdy, k, seg, nblk, dx)


@parallel_kernel
def backward_two_pass_cf(
    dy, x, c_, mean, invstd, gamma, seg, nblk, dx, sum_dy, sum_dy_xhat
):  # pragma: no cover - compiled
    """The unfused channels-first backward in one call: ``backward_reduce_cf``, the per-channel
    coefficients of ``dx = a (dy - mdy - (x - mean) k)``::

        a = gamma invstd,  mdy = sum_dy / m,  k = sum_dy_xhat / m * invstd   (m = N * S)

    then ``backward_dx_cf``. dy, x, dx: (N*C, S) as there; sum_dy and sum_dy_xhat are filled.

    One compiled call instead of two and the NumPy vector arithmetic between them: four small
    ufunc calls cost 5 us in a loop but 62 us right after a torch.nn forward+backward on
    (64, 16, 32, 32) has gone through the caches (what a training step does between BN
    layers), a compiled loop 15 us.
    """
    _reduce_cf(dy, x, c_, mean, invstd, seg, nblk, sum_dy, sum_dy_xhat)
    m = (x.shape[0] // c_) * x.shape[1]
    a = np.empty(c_)
    mdy = np.empty(c_)
    k = np.empty(c_)
    for c in range(c_):
        a[c] = gamma[c] * invstd[c]
        mdy[c] = sum_dy[c] / m
        k[c] = sum_dy_xhat[c] / m * invstd[c]
    _dx_cf(dy, x, c_, mean, a, mdy, k, seg, nblk, dx)


# Rows reductions sum SUB rows into float32 accumulator rows (L1-resident) before one float64
# update: fewer float64 conversions and accumulator-row loads/stores than 4-row groups.
# One thread, float32, raw reduce: (50176, 64) 1146 -> 700 us, (4096, 256) 171 -> 159 us,
# (256, 1024) 46 -> 42 us; relative error of sum_dy_xhat 5e-8 -> 1.1e-7 (float64: 1e-16).
SUB = 32


@elementwise_kernel
def backward_reduce_rows(
    dy, x, mean_hi, mean_lo, invstd, nblk, sum_dy, sum_dy_xhat
):  # pragma: no cover - compiled
    """dy, x: (R, C); per-block rows of C partial sums, vectorized across channels.

    ``SUB`` rows are summed in x's dtype, ``dy (x - mean_hi)`` (exact subtraction near the
    mean), then added to float64 rows; the low half of the mean enters once per block as
    ``- mean_lo * sum dy``. Without cross-lane reductions the kernel needs no ``reassoc``.
    """
    r_, c_ = x.shape
    part = np.zeros((nblk, 2, c_))
    for b in prange(nblk):
        _reduce_block(dy, x, mean_hi, mean_lo, b * r_ // nblk, (b + 1) * r_ // nblk, part[b, 0], part[b, 1])
    for c in range(c_):
        sum_dy[c] = 0.0
        sum_dy_xhat[c] = 0.0
    for b in range(nblk):
        for c in range(c_):
            sum_dy[c] += part[b, 0, c]
            sum_dy_xhat[c] += part[b, 1, c]
    for c in range(c_):
        sum_dy_xhat[c] *= invstd[c]


@numba.njit(fastmath=ELEMENTWISE, cache=True, error_model="numpy", nogil=True)
def _reduce_block(dy, x, hi, lo, r0, r1, s1, s2):  # pragma: no cover - compiled
    """s1 += sum dy, s2 += sum dy (x - hi) - lo sum dy over rows [r0, r1) (see SUB)."""
    c_ = x.shape[1]
    t1 = np.empty(c_, x.dtype)
    t2 = np.empty(c_, x.dtype)
    g1 = np.zeros(c_)
    for s in range(r0, r1, SUB):
        for j in range(c_):
            t1[j] = 0.0
            t2[j] = 0.0
        for r in range(s, min(s + SUB, r1)):
            gr = dy[r]
            xr = x[r]
            for j in range(c_):
                t1[j] += gr[j]
                t2[j] += gr[j] * (xr[j] - hi[j])
        for j in range(c_):
            g1[j] += t1[j]
            s2[j] += t2[j]
    for j in range(c_):
        s1[j] += g1[j]
        s2[j] -= lo[j] * g1[j]


@elementwise_kernel
def backward_dx_rows(dy, x, mean_hi, mean_lo, a, mdy, k, nblk, dx):  # pragma: no cover - compiled
    """dy, x, dx: (R, C); rows split into ``nblk`` blocks, the inner loop across channels.

    All in x's dtype (vectors cast by the dispatcher, two-part mean): (256, 1024) float32, one
    thread, reused out: 63 -> 30 us (float64 arithmetic before); a copy takes 24 us.
    """
    r_, c_ = x.shape
    mdy2 = mdy - mean_lo * k  # the low half of the mean folded in once (as normalize_rows)
    for b in prange(nblk):
        for r in range(b * r_ // nblk, (b + 1) * r_ // nblk):
            xr = x[r]
            gr = dy[r]
            dr = dx[r]
            for c in range(c_):
                dr[c] = a[c] * (gr[c] - mdy2[c] - (xr[c] - mean_hi[c]) * k[c])


@elementwise_kernel
def backward_rows(
    dy, x, groups, run, nblk, mean, invstd, gamma, dx, sum_dy, sum_dy_xhat
):  # pragma: no cover - compiled
    """dy, x, dx: (R, W) rows, column j of channel ``(j // run) % C``, W = groups * C * run (as
    ``forward_rows``: rows regrouped, or a channels-first input with short S read as rows of
    C * S); both passes in one call.

    The reduction as ``backward_reduce_rows`` (``_reduce_block``: SUB rows in x's dtype per
    float64 update, two-part mean), the per-channel combine, then the dx pass in x's dtype. One call instead
    of two kernels and the NumPy vector arithmetic between them, for every rows input. One
    thread, float32, reused out, kernels.backward: (256, 1024) 142 -> 130 us, (50176, 64)
    2224 -> 2169 us (the two kernels, themselves sped up, vs this one; noisy shared machine).
    Short runs read as rows: raw kernel, float32, 2 threads, vs ``backward_cf``:
    (512, 256, 2, 2) 161 vs 1059 us, (1024, 16, 3, 3) 45 vs 198 us, (128, 64, 4, 4) 47 vs 87 us.
    """
    r_, w_ = x.shape
    c_ = w_ // (groups * run)
    # column j = (g * C + c) * run + i, walked in that order (as forward_rows)
    hi = x[0].copy()
    lo = x[0].copy()
    j = 0
    for _ in range(groups):
        for c in range(c_):
            for _ in range(run):
                hi[j] = mean[c]
                lo[j] = mean[c] - hi[j]
                j += 1
    part = np.zeros((nblk, 2, w_))
    for b in prange(nblk):
        _reduce_block(dy, x, hi, lo, b * r_ // nblk, (b + 1) * r_ // nblk, part[b, 0], part[b, 1])
    for c in range(c_):
        sum_dy[c] = 0.0
        sum_dy_xhat[c] = 0.0
    for b in range(nblk):
        j = 0
        for _ in range(groups):
            for c in range(c_):
                for _ in range(run):
                    sum_dy[c] += part[b, 0, j]
                    sum_dy_xhat[c] += part[b, 1, j]
                    j += 1
    m = r_ * groups * run
    a = x[0].copy()
    mdy = x[0].copy()
    k = x[0].copy()
    for c in range(c_):
        sum_dy_xhat[c] *= invstd[c]
    j = 0
    for _ in range(groups):
        for c in range(c_):
            for _ in range(run):
                a[j] = gamma[c] * invstd[c]  # gamma invstd
                mdy[j] = sum_dy[c] / m  # mean(dy)
                k[j] = sum_dy_xhat[c] / m * invstd[c]  # mean(dy x_hat) invstd, multiplies (x - mean)
                mdy[j] -= lo[j] * k[j]  # the low half of the mean folded in (as backward_dx_rows)
                j += 1
    for b in prange(nblk):
        for r in range(b * r_ // nblk, (b + 1) * r_ // nblk):
            xr = x[r]
            gr = dy[r]
            dr = dx[r]
            for j in range(w_):
                dr[j] = a[j] * (gr[j] - mdy[j] - (xr[j] - hi[j]) * k[j])
