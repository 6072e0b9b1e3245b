"""Batch normalization as written in Ioffe & Szegedy (2015), in plain NumPy.

This module is the specification: every kernel, module and tool of the package is tested
against it. It favours readability over speed: one line per formula, the paper's names.

For an input ``x`` of shape ``(N, C)`` or ``(N, C, *spatial)``, statistics are taken per
channel ``c`` over every other axis, i.e. over ``m = N * prod(spatial)`` values::

    mean    = 1/m * sum_i x_i                       (mu_B)
    var     = 1/m * sum_i (x_i - mean)^2            (sigma_B^2, biased)
    invstd  = 1 / sqrt(var + eps)
    x_hat_i = (x_i - mean) * invstd
    y_i     = gamma * x_hat_i + beta

At prediction time the running estimates replace the batch statistics::

    y = gamma * (x - running_mean) / sqrt(running_var + eps) + beta

The running estimates follow PyTorch's convention (Keras and Flax use ``1 - momentum``)::

    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)

The running variance is *unbiased* (Bessel's correction) while the normalization uses the
*biased* batch variance; this is what the paper's Algorithm 2 prescribes and what torch does.

Shape:
    x, y, dy, dx: ``(N, C, *spatial)``; gamma, beta, statistics: ``(C,)``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "Cache",
    "backward",
    "backward_compact",
    "forward",
    "forward_inference",
    "momentum_factor",
    "reduction_axes",
    "update_running",
]


class Cache(NamedTuple):
    """What the training forward keeps for the backward pass."""

    x: np.ndarray
    x_hat: np.ndarray
    mean: np.ndarray
    var: np.ndarray
    invstd: np.ndarray
    gamma: np.ndarray


def reduction_axes(x: np.ndarray) -> tuple[int, ...]:
    """Every axis but the channel axis 1: batch and spatial positions."""
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (N, C) or (N, C, *spatial), got {x.ndim}-D shape {x.shape}")
    return (0,) + tuple(range(2, x.ndim))


def _per_channel(v: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a (C,) vector so it broadcasts against (N, C, *spatial)."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _affine(x: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None):
    channels = x.shape[1]
    gamma = np.ones(channels, x.dtype) if gamma is None else np.asarray(gamma)
    beta = np.zeros(channels, x.dtype) if beta is None else np.asarray(beta)
    return gamma, beta


def forward(
    x: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float = 1e-5
) -> tuple[np.ndarray, Cache]:
    """Training-mode forward (the paper's Algorithm 1). Returns ``(y, cache)``.

    ``gamma=None`` means 1 and ``beta=None`` means 0 (``affine=False``).
    """
    axes = reduction_axes(x)
    gamma, beta = _affine(x, gamma, beta)
    c = lambda v: _per_channel(v, x.ndim)  # noqa: E731
    mean = x.mean(axis=axes)  # mu_B = 1/m sum x_i
    var = ((x - c(mean)) ** 2).mean(axis=axes)  # sigma_B^2 = 1/m sum (x_i - mu_B)^2
    invstd = 1.0 / np.sqrt(var + eps)  # 1 / sqrt(sigma_B^2 + eps)
    x_hat = (x - c(mean)) * c(invstd)  # x_hat_i = (x_i - mu_B) / sqrt(sigma_B^2 + eps)
    y = c(gamma) * x_hat + c(beta)  # y_i = gamma x_hat_i + beta
    return y, Cache(x, x_hat, mean, var, invstd, gamma)


def backward(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training-mode backward, the chain rule of the paper's Section 3 term by term.

    Returns ``(dx, dgamma, dbeta)``. See docs/math.md for the derivation.
    """
    x, x_hat, mean, var, invstd, gamma = cache
    axes = reduction_axes(x)
    m = x.size // x.shape[1]
    c = lambda v: _per_channel(v, x.ndim)  # noqa: E731
    centered = x - c(mean)
    dbeta = dy.sum(axis=axes)  # dl/dbeta = sum dl/dy_i
    dgamma = (dy * x_hat).sum(axis=axes)  # dl/dgamma = sum dl/dy_i x_hat_i
    dx_hat = dy * c(gamma)  # dl/dx_hat_i = dl/dy_i gamma
    # dl/dvar = sum dl/dx_hat_i (x_i - mu_B) * -1/2 (var + eps)^(-3/2)
    dvar = (dx_hat * centered).sum(axis=axes) * -0.5 * invstd**3
    # dl/dmu = sum dl/dx_hat_i * -1/sqrt(var + eps) + dl/dvar * sum -2 (x_i - mu_B) / m
    dmean = (dx_hat * -c(invstd)).sum(axis=axes) + dvar * (-2.0 * centered).sum(axis=axes) / m
    # dl/dx_i = dl/dx_hat_i / sqrt(var + eps) + dl/dvar 2 (x_i - mu_B) / m + dl/dmu / m
    dx = dx_hat * c(invstd) + c(dvar) * 2.0 * centered / m + c(dmean) / m
    return dx, dgamma, dbeta


def backward_compact(dy: np.ndarray, cache: Cache) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The same gradient folded into the form the kernels compute (docs/math.md, last step)::

    dx = gamma * invstd * (dy - mean(dy) - x_hat * mean(dy * x_hat))
    """
    x, x_hat, _, _, invstd, gamma = cache
    axes = reduction_axes(x)
    m = x.size // x.shape[1]
    c = lambda v: _per_channel(v, x.ndim)  # noqa: E731
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * x_hat).sum(axis=axes)
    dx = c(gamma * invstd) * (dy - c(dbeta / m) - x_hat * c(dgamma / m))
    return dx, dgamma, dbeta


def forward_inference(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = 1e-5,
) -> np.ndarray:
    """Prediction-mode forward: the running estimates stand in for the batch statistics."""
    gamma, beta = _affine(x, gamma, beta)
    c = lambda v: _per_channel(np.asarray(v), x.ndim)  # noqa: E731
    x_hat = (x - c(running_mean)) / np.sqrt(c(running_var) + eps)
    return c(gamma) * x_hat + c(beta)


def momentum_factor(momentum: float | None, num_batches_tracked: int) -> float:
    """The weight of the new batch in the running estimate.

    ``momentum=None`` means a cumulative moving average: after the k-th batch
    (``num_batches_tracked == k``) the weight is 1/k, so the estimate is the plain mean
    of every batch statistic seen so far.
    """
    if momentum is None:
        return 1.0 / num_batches_tracked
    return momentum


def update_running(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    count: int,
    momentum: float,
) -> tuple[np.ndarray, np.ndarray]:
    """New running estimates from a batch's biased statistics over ``count`` values each.

    Returns new arrays; the inputs are not modified.
    """
    unbiased_var = var * count / (count - 1)  # Bessel's correction for the population estimate
    new_mean = (1.0 - momentum) * running_mean + momentum * mean
    new_var = (1.0 - momentum) * running_var + momentum * unbiased_var
    return new_mean, new_var
