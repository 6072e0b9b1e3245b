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

* Statistics are two-pass (mean, then the centred sum of squares) in float64 *per row or
  per row block*, while that block sits in L1/L2, then merged with Chan's pairwise formula
  ``M2 = sum M2_b + sum n_b (mean_b - mean)^2``. The input is read from memory once for the
  statistics, and no cancellation happens for large offsets (E[x^2] - E[x]^2 loses all digits
  at mean 1e4, std 1 in float32).
* Compiled with the package's shared choices (``kernels/_jit.py``): cached, ``reassoc`` so the
  float64 row sums vectorize, no ``nnan``/``ninf`` so NaN and inf propagate as in torch; each
  parallel kernel has a ``.serial`` twin that the dispatch runs on small inputs.
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

from batchnorm.kernels._jit import FASTMATH, parallel_kernel

IDENTITY, RELU, LEAKY_RELU, SILU = 0, 1, 2, 3


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _act(z, act, slope):
    if act == RELU:
        return z if z > 0.0 else 0.0
    if act == LEAKY_RELU:
        return z if z > 0.0 else z * slope
    if act == SILU:
        return z / (1.0 + math.exp(-z))
    return z


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _act_grad(z, act, slope):
    """d act / dz at z (relu's derivative at 0 is 0, as in torch)."""
    if act == RELU:
        return 1.0 if z > 0.0 else 0.0
    if act == LEAKY_RELU:
        return 1.0 if z > 0.0 else slope
    if act == SILU:
        s = 1.0 / (1.0 + math.exp(-z))
        return s * (1.0 + z * (1.0 - s))
    return 1.0


@numba.njit(inline="always", cache=True, fastmath=FASTMATH, error_model="numpy")
def _pre_act(v, from_output, act, slope):
    """z from the saved value: x's z is computed by the caller; y's z is act^-1(y)."""
    if from_output and act == LEAKY_RELU and v <= 0.0:
        return v / slope
    return v


@parallel_kernel
def row_stats_ncs(x, row_mean, row_m2):
    """Per (n, c) row: mean and centred sum of squares over S, in float64."""
    n_rows, channels, size = x.shape
    for r in prange(n_rows * channels):
        n, c = r // channels, r % channels
        s = 0.0
        for i in range(size):
            s += x[n, c, i]
        mean = s / size
        m2 = 0.0
        for i in range(size):
            d = x[n, c, i] - mean
            m2 += d * d
        row_mean[n, c] = mean
        row_m2[n, c] = m2


@parallel_kernel
def block_stats_rc(x, starts, block_mean, block_m2):
    """Per block of rows [starts[b], starts[b+1]): per-channel mean and centred sum of squares."""
    n_blocks = starts.shape[0] - 1
    channels = x.shape[1]
    for b in prange(n_blocks):
        lo, hi = starts[b], starts[b + 1]
        acc = np.zeros(channels, np.float64)
        for r in range(lo, hi):
            for c in range(channels):
                acc[c] += x[r, c]
        for c in range(channels):
            acc[c] /= hi - lo
        m2 = np.zeros(channels, np.float64)
        for r in range(lo, hi):
            for c in range(channels):
                d = x[r, c] - acc[c]
                m2[c] += d * d
        block_mean[b, :] = acc
        block_m2[b, :] = m2


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


@parallel_kernel
def normalize_act_ncs(x, scale, shift, act, slope, y):
    """y = act(x * scale + shift), scale = gamma * invstd, shift = beta - mean * scale."""
    n_rows, channels, size = x.shape
    for r in prange(n_rows * channels):
        n, c = r // channels, r % channels
        a, b = scale[c], shift[c]
        for i in range(size):
            y[n, c, i] = _act(x[n, c, i] * a + b, act, slope)


@parallel_kernel
def normalize_act_rc(x, scale, shift, act, slope, starts, y):
    channels = x.shape[1]
    for b in prange(starts.shape[0] - 1):
        for r in range(starts[b], starts[b + 1]):
            for c in range(channels):
                y[r, c] = _act(x[r, c] * scale[c] + shift[c], act, slope)


@parallel_kernel
def backward_reduce_ncs(dy, v, mean, invstd, gamma, beta, act, slope, from_output, p_dz, p_dz_xhat):
    """Per row: sum(dz) and sum(dz * x_hat); ``v`` is x, or y when ``from_output``."""
    n_rows, channels, size = dy.shape
    for r in prange(n_rows * channels):
        n, c = r // channels, r % channels
        g, bt, mu, istd = gamma[c], beta[c], mean[c], invstd[c]
        s_dz = 0.0
        s_dz_xhat = 0.0
        for i in range(size):
            if from_output:
                z = _pre_act(v[n, c, i], True, act, slope)
                x_hat = (z - bt) / g
            else:
                x_hat = (v[n, c, i] - mu) * istd
                z = g * x_hat + bt
            dz = dy[n, c, i] * _act_grad(z, act, slope)
            s_dz += dz
            s_dz_xhat += dz * x_hat
        p_dz[n, c] = s_dz
        p_dz_xhat[n, c] = s_dz_xhat


@parallel_kernel
def backward_dx_ncs(dy, v, mean, invstd, gamma, beta, act, slope, from_output, mean_dz, mean_dz_xhat, dx):
    """dx = gamma * invstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))."""
    n_rows, channels, size = dy.shape
    for r in prange(n_rows * channels):
        n, c = r // channels, r % channels
        g, bt, mu, istd = gamma[c], beta[c], mean[c], invstd[c]
        k, m_dz, m_dzx = g * istd, mean_dz[c], mean_dz_xhat[c]
        for i in range(size):
            if from_output:
                z = _pre_act(v[n, c, i], True, act, slope)
                x_hat = (z - bt) / g
            else:
                x_hat = (v[n, c, i] - mu) * istd
                z = g * x_hat + bt
            dz = dy[n, c, i] * _act_grad(z, act, slope)
            dx[n, c, i] = k * (dz - m_dz - x_hat * m_dzx)


@parallel_kernel
def backward_reduce_rc(dy, v, mean, invstd, gamma, beta, act, slope, from_output, starts, p_dz, p_dz_xhat):
    channels = dy.shape[1]
    for b in prange(starts.shape[0] - 1):
        s_dz = np.zeros(channels, np.float64)
        s_dz_xhat = np.zeros(channels, np.float64)
        for r in range(starts[b], starts[b + 1]):
            for c in range(channels):
                if from_output:
                    z = _pre_act(v[r, c], True, act, slope)
                    x_hat = (z - beta[c]) / gamma[c]
                else:
                    x_hat = (v[r, c] - mean[c]) * invstd[c]
                    z = gamma[c] * x_hat + beta[c]
                dz = dy[r, c] * _act_grad(z, act, slope)
                s_dz[c] += dz
                s_dz_xhat[c] += dz * x_hat
        p_dz[b, :] = s_dz
        p_dz_xhat[b, :] = s_dz_xhat


@parallel_kernel
def backward_dx_rc(
    dy, v, mean, invstd, gamma, beta, act, slope, from_output, mean_dz, mean_dz_xhat, starts, dx
):
    channels = dy.shape[1]
    for b in prange(starts.shape[0] - 1):
        for r in range(starts[b], starts[b + 1]):
            for c in range(channels):
                if from_output:
                    z = _pre_act(v[r, c], True, act, slope)
                    x_hat = (z - beta[c]) / gamma[c]
                else:
                    x_hat = (v[r, c] - mean[c]) * invstd[c]
                    z = gamma[c] * x_hat + beta[c]
                dz = dy[r, c] * _act_grad(z, act, slope)
                dx[r, c] = gamma[c] * invstd[c] * (dz - mean_dz[c] - x_hat * mean_dz_xhat[c])
