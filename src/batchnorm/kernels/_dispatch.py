"""Dispatch: the one place that checks layouts and dtypes and picks a kernel.

Contract (shared by the numba kernels here and the Triton kernels in ``kernels/triton``):

* ``x``, ``dy``: ``(N, C, *spatial)``, any strides; float32 or float64 (float16 is computed in
  float32). Outputs have x's dtype and x's memory layout (channels-last stays channels-last).
* Statistics (``mean``, ``var``, ``invstd``, sums) are ``(C,)`` in the *compute dtype*: float64
  for float64 input, float32 otherwise; they are accumulated in float64 internally.
* ``gamma``/``beta`` may be ``None`` (meaning 1 and 0).

Functions::

    forward_train(x, gamma, beta, eps)        -> (y, mean, var, invstd)   var is biased
    normalize(x, mean, invstd, gamma, beta)   -> y = (x - mean) * invstd * gamma + beta
    channel_stats(x)                          -> (mean, var)              biased, over N*S values
    backward_reduce(dy, x, mean, invstd)      -> (sum_dy, sum_dy_xhat)
    backward_dx(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count) -> dx
    backward(dy, x, mean, invstd, gamma)      -> (dx, dgamma, dbeta)

TEMPORARY BODY: a vectorized NumPy implementation that fixes the contract; the numba kernels
replace it.
"""

from __future__ import annotations

import numpy as np


def _compute_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _c(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    dt = _compute_dtype(x)
    x64 = x.astype(np.float64)
    mean = x64.mean(axis=_axes(x))
    var = ((x64 - _c(mean, x.ndim)) ** 2).mean(axis=_axes(x))
    return mean.astype(dt), var.astype(dt)


def normalize(x, mean, invstd, gamma=None, beta=None, out=None):
    scale = np.asarray(invstd, np.float64) * (1.0 if gamma is None else np.asarray(gamma, np.float64))
    shift = 0.0 if beta is None else np.asarray(beta, np.float64)
    y = (x.astype(np.float64) - _c(np.asarray(mean, np.float64), x.ndim)) * _c(np.broadcast_to(scale, mean.shape), x.ndim)
    y = y + _c(np.broadcast_to(shift, mean.shape), x.ndim)
    if out is None:
        out = np.empty_like(x)
    out[...] = y
    return out


def forward_train(x, gamma, beta, eps, out=None):
    mean, var = channel_stats(x)
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(mean.dtype)
    y = normalize(x, mean, invstd, gamma, beta, out=out)
    return y, mean, var, invstd


def backward_reduce(dy, x, mean, invstd):
    dt = _compute_dtype(x)
    x_hat = (x.astype(np.float64) - _c(mean.astype(np.float64), x.ndim)) * _c(invstd.astype(np.float64), x.ndim)
    dy64 = dy.astype(np.float64)
    return dy64.sum(axis=_axes(x)).astype(dt), (dy64 * x_hat).sum(axis=_axes(x)).astype(dt)


def backward_dx(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count, out=None):
    n = x.ndim
    g = 1.0 if gamma is None else _c(np.asarray(gamma, np.float64), n)
    x_hat = (x.astype(np.float64) - _c(mean.astype(np.float64), n)) * _c(invstd.astype(np.float64), n)
    dx = g * _c(invstd.astype(np.float64), n) * (
        dy.astype(np.float64) - _c(sum_dy.astype(np.float64) / count, n) - x_hat * _c(sum_dy_xhat.astype(np.float64) / count, n)
    )
    if out is None:
        out = np.empty_like(x)
    out[...] = dx
    return out


def backward(dy, x, mean, invstd, gamma):
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd)
    count = x.size // x.shape[1]
    dx = backward_dx(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count)
    return dx, sum_dy_xhat, sum_dy


def num_threads() -> int:
    """Threads the kernels use."""
    return 1


def backend_table() -> list[dict[str, str]]:
    """One row per (input dtype, layout): the kernel that runs, for ``batchnorm info``."""
    return [{"input": "any", "layout": "any", "kernel": "numpy (temporary)"}]
