"""Per-channel batch statistics: the kernels behind ``reference.forward``'s first two lines::

    mean = 1/m * sum_i x_i
    var  = 1/m * sum_i (x_i - mean)^2        (biased)

Two passes over each block of values, accumulated in float64: the first finds the block mean,
the second sums squared deviations from it while the block is still in cache. Blocks are then
combined exactly (Chan et al.'s pairwise formula, all terms non-negative)::

    mean = sum_b n_b mean_b / m
    M2   = sum_b (M2_b + n_b (mean_b - mean)^2)

Never E[x^2] - E[x]^2: in float32 with mean 1e4 and std 1 that formula loses every digit
(issue #7 measured an output error of 1.3e3 for it).

Layouts: ``cf`` is (N, C, S) C-contiguous, a channel's values are N runs of S; the flat index
j in [0, N*S) of a channel maps to (j // S, j % S). ``rows`` is (R, C) C-contiguous (channels
last); its loops run across channels so they vectorize.

Block loops index 1-D row slices from 0: indexing ``x[n, c, i]`` with ``i`` starting at a
computed (possibly negative to numba) bound keeps the negative-index wraparound check in the
loop and blocks vectorization, 9x slower (1.04 ms vs 0.11 ms summing 1.6M float32 values).
"""

from __future__ import annotations

import numba
import numpy as np
from numba import prange

from batchnorm.kernels._jit import ELEMENTWISE, elementwise_kernel, parallel_kernel


@parallel_kernel
def stats_cf(x, c_, seg, nblk, mean, var):  # pragma: no cover - compiled
    """x: (N*C, S), row q belongs to channel q % C. Each row split into ``seg`` pieces (units).

    Units are taken in memory order, a contiguous range per thread, so every thread streams
    through x sequentially; the pieces' (mean, M2) pairs are combined per channel afterwards.
    The former channel-major order (a channel's N runs of S, 1.6 MB apart on
    (16, 512, 28, 28)) defeated the prefetcher and the TLB. Whole rows (``seg == 1``) go in
    ``nblk`` ranges without the per-unit integer divisions (see ``forward.normalize_cf``).
    """
    r_, s_ = x.shape
    n_ = r_ // c_
    units = r_ * seg
    pmean = np.empty(units)
    pm2 = np.empty(units)
    for b in prange(nblk):
        for u in range(b * units // nblk, (b + 1) * units // nblk):
            xr = x[u] if seg == 1 else x[u // seg, u % seg * s_ // seg : (u % seg + 1) * s_ // seg]
            total = 0.0
            for i in range(xr.shape[0]):
                total += xr[i]
            mu = total / xr.shape[0]
            m2 = 0.0
            for i in range(xr.shape[0]):
                d = xr[i] - mu
                m2 += d * d
            pmean[u] = mu
            pm2[u] = m2
    m = n_ * s_
    for c in range(c_):
        mean[c] = 0.0
        var[c] = 0.0
    for n in range(n_):
        for c in range(c_):
            u0 = (n * c_ + c) * seg
            for p in range(seg):
                mean[c] += ((p + 1) * s_ // seg - p * s_ // seg) * pmean[u0 + p]
    for c in range(c_):
        mean[c] /= m
    for n in range(n_):
        for c in range(c_):
            u0 = (n * c_ + c) * seg
            for p in range(seg):
                d = pmean[u0 + p] - mean[c]
                var[c] += pm2[u0 + p] + ((p + 1) * s_ // seg - p * s_ // seg) * d * d
    for c in range(c_):
        var[c] /= m


# Rows statistics: SUB rows of shifted values summed in float32 accumulator rows (L1-resident)
# before one float64 update; a block's shift is its first rows' mean (see ``_stats_block``).
SUB = 32
# Up to this many first rows of a block give its shift.
SHIFT_ROWS = 8


@elementwise_kernel
def stats_rows(x, nblk, mean, var):  # pragma: no cover - compiled
    """x: (R, C). Rows split into ``nblk`` blocks; each gives a row of C (mean, M2) pairs.

    One pass per block over shifted values (``_stats_block``), vectorized across channels in
    float32, instead of two passes in float64 (four rows per float64 update). One thread,
    float32, raw kernel: (256, 1024) 44 -> 33 us, (4096, 256) 172 -> 125 us, (50176, 64)
    550 -> 430 us. Compiled without ``reassoc``: it could fold the shift away.
    """
    r_, c_ = x.shape
    bmean = np.zeros((nblk, c_))
    bm2 = np.zeros((nblk, c_))
    for b in prange(nblk):
        _stats_block(x, b * r_ // nblk, (b + 1) * r_ // nblk, bmean[b], bm2[b])
    for c in range(c_):
        mean[c] = 0.0
        var[c] = 0.0
    for b in range(nblk):
        w = ((b + 1) * r_ // nblk) - (b * r_ // nblk)
        for c in range(c_):
            mean[c] += w * bmean[b, c]
    for c in range(c_):
        mean[c] /= r_
    for b in range(nblk):
        w = ((b + 1) * r_ // nblk) - (b * r_ // nblk)
        for c in range(c_):
            d = bmean[b, c] - mean[c]
            var[c] += bm2[b, c] + w * d * d
    for c in range(c_):
        var[c] /= r_


@numba.njit(fastmath=ELEMENTWISE, cache=True, error_model="numpy", nogil=True)
def _stats_block(x, r0, r1, mu, m2):  # pragma: no cover - compiled
    """mu, m2 (float64, C) = mean and M2 of rows [r0, r1) of x, one pass about a shift k::

        d = x - k,  mu = k + sum d / n,  M2 = sum d^2 - n (mu - k)^2

    k per channel is the mean of the first SHIFT_ROWS rows (``x[r0] + mean(x[r] - x[r0])``,
    the differences exact near the data), so ``(mu - k)^2`` is ~var / SHIFT_ROWS and the
    subtraction keeps nearly all digits: it is never E[x^2] - E[x]^2. A channel where the
    correction exceeds half of ``sum d^2`` (so that at most one bit is lost to it) is
    recomputed exactly, two passes in float64 (the whole block if many channels need it).
    """
    n = r1 - r0
    c_ = x.shape[1]
    x0 = x[r0]
    h = min(SHIFT_ROWS, n)
    t1 = np.zeros(c_, x.dtype)
    t2 = np.empty(c_, x.dtype)
    for r in range(r0 + 1, r0 + h):
        xr = x[r]
        for j in range(c_):
            t1[j] += xr[j] - x0[j]
    k = np.empty(c_, x.dtype)
    for j in range(c_):
        k[j] = x0[j] + t1[j] / h
        mu[j] = 0.0
        m2[j] = 0.0
    for s in range(r0, r1, SUB):
        for j in range(c_):
            t1[j] = 0.0
            t2[j] = 0.0
        # One row per pass over the accumulator rows. Four rows per pass (one load and store
        # of t1[j], t2[j] per four values) was faster on data in cache ((256, 1024) float32,
        # one thread: 33 -> 23 us) and slower on data coming from memory, the common case
        # (after evicting the caches: (4096, 256) 434 -> 534 us, (12544, 256) 1098 -> 1604 us:
        # four interleaved row streams defeat the prefetcher).
        for r in range(s, min(s + SUB, r1)):
            xr = x[r]
            for j in range(c_):
                d = xr[j] - k[j]
                t1[j] += d
                t2[j] += d * d
        for j in range(c_):
            mu[j] += t1[j]
            m2[j] += t2[j]
    redo = np.empty(c_, np.bool_)
    count = 0
    for j in range(c_):
        e = mu[j] / n
        corr = n * e * e
        redo[j] = corr > 0.5 * m2[j]
        count += redo[j]
        mu[j] = k[j] + e
        m2[j] -= corr
    if count > c_ // 16:
        # many channels (rows drifting within the block: sorted data): the block again, two
        # vectorized passes in float64
        for j in range(c_):
            mu[j] = 0.0
            m2[j] = 0.0
        for r in range(r0, r1):
            xr = x[r]
            for j in range(c_):
                mu[j] += xr[j]
        for j in range(c_):
            mu[j] /= n
        for r in range(r0, r1):
            xr = x[r]
            for j in range(c_):
                d = xr[j] - mu[j]
                m2[j] += d * d
    elif count:
        # a few channels (a 3-sigma shift): those again, two passes in float64 down the column
        for j in range(c_):
            if redo[j]:
                total = 0.0
                for r in range(r0, r1):
                    total += x[r, j]
                mu[j] = total / n
                total = 0.0
                for r in range(r0, r1):
                    d = x[r, j] - mu[j]
                    total += d * d
                m2[j] = total
