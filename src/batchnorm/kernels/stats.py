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

import numpy as np
from numba import prange

from batchnorm.kernels._jit import parallel_kernel


@parallel_kernel
def stats_cf(x, nblk, mean, var):  # pragma: no cover - compiled
    """x: (N, C, S). Each channel's N*S values split into ``nblk`` blocks (one unit per thread)."""
    n_, c_, s_ = x.shape
    m = n_ * s_
    bmean = np.empty((c_, nblk))
    bm2 = np.empty((c_, nblk))
    for u in prange(c_ * nblk):
        c = u // nblk
        b = u % nblk
        j0 = b * m // nblk
        j1 = (b + 1) * m // nblk
        total = 0.0
        for n in range(j0 // s_, (j1 + s_ - 1) // s_):
            xr = x[n, c, max(j0 - n * s_, 0) : min(j1 - n * s_, s_)]
            for i in range(xr.shape[0]):
                total += xr[i]
        mu = total / (j1 - j0)
        m2 = 0.0
        for n in range(j0 // s_, (j1 + s_ - 1) // s_):
            xr = x[n, c, max(j0 - n * s_, 0) : min(j1 - n * s_, s_)]
            for i in range(xr.shape[0]):
                d = xr[i] - mu
                m2 += d * d
        bmean[c, b] = mu
        bm2[c, b] = m2
    for c in range(c_):
        mu = 0.0
        for b in range(nblk):
            mu += (((b + 1) * m // nblk) - (b * m // nblk)) * bmean[c, b]
        mu /= m
        m2 = 0.0
        for b in range(nblk):
            d = bmean[c, b] - mu
            m2 += bm2[c, b] + (((b + 1) * m // nblk) - (b * m // nblk)) * d * d
        mean[c] = mu
        var[c] = m2 / m


@parallel_kernel
def stats_rows(x, nblk, mean, var):  # pragma: no cover - compiled
    """x: (R, C). Rows split into ``nblk`` blocks; each accumulates a row of C partial sums.

    Four rows are added (in float64) before touching the accumulator row: its load and store
    per element were the bottleneck. Single thread, float32: (256, 1024) 0.063 -> 0.042 ms,
    (4096, 256) 0.26 -> 0.17 ms, (50176, 64) 1.15 -> 0.51 ms.
    """
    r_, c_ = x.shape
    bmean = np.zeros((nblk, c_))
    bm2 = np.zeros((nblk, c_))
    for b in prange(nblk):
        r0 = b * r_ // nblk
        r1 = (b + 1) * r_ // nblk
        r4 = r1 - (r1 - r0) % 4
        acc = bmean[b]
        for r in range(r0, r4, 4):
            x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
            for c in range(c_):
                acc[c] += (np.float64(x0[c]) + x1[c]) + (np.float64(x2[c]) + x3[c])
        for r in range(r4, r1):
            xr = x[r]
            for c in range(c_):
                acc[c] += xr[c]
        for c in range(c_):
            acc[c] /= r1 - r0
        sq = bm2[b]
        for r in range(r0, r4, 4):
            x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
            for c in range(c_):
                mu = acc[c]
                d0, d1, d2, d3 = x0[c] - mu, x1[c] - mu, x2[c] - mu, x3[c] - mu
                sq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        for r in range(r4, r1):
            xr = x[r]
            for c in range(c_):
                d = xr[c] - acc[c]
                sq[c] += d * d
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
