"""``batchnorm.BatchNorm``: the NumPy layer in the form people learn from, on the fused kernels.

Training (``forward(x, training=True)``), per channel over every axis but 1 (m values)::

    mean   = 1/m sum_i x_i
    var    = 1/m sum_i (x_i - mean)^2                          (biased, for the normalization)
    x_hat  = (x - mean) / sqrt(var + eps)
    y      = gamma * x_hat + beta
    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)   (unbiased)

Prediction (``training=False``) uses the running estimates in place of ``mean`` and ``var``.
``backward(dout)`` returns dL/dx for the last forward and stores dL/dgamma and dL/dbeta in
``dgamma`` and ``dbeta``::

    dbeta  = sum_i dout_i
    dgamma = sum_i dout_i x_hat_i
    dx     = gamma / sqrt(var + eps) * (dout - dbeta / m - x_hat * dgamma / m)     (training)
    dx     = gamma / sqrt(running_var + eps) * dout                               (prediction)

Momentum follows PyTorch (the weight of the *new* batch; Keras and Flax use ``1 - momentum``);
``momentum=None`` is a cumulative moving average over the ``num_batches_tracked`` batches seen.

Shape:
    x, y, dout, dx: ``(N, C)`` or ``(N, C, *spatial)`` with ``C == num_features``;
    gamma, beta, dgamma, dbeta, running_mean, running_var: ``(C,)``.

This module needs NumPy and numba only, never torch.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from batchnorm import kernels
from batchnorm.reference import momentum_factor, update_running

__all__ = ["BatchNorm"]


class _Saved(NamedTuple):
    """What the last forward keeps for ``backward``."""

    x: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    training: bool


class BatchNorm:
    """Batch normalization over axis 1 of NumPy arrays, with parameters, gradients and running stats.

    Args:
        num_features: C, the size of axis 1.
        eps: added to the variance before the square root; must be > 0.
        momentum: weight of the new batch in the running estimates (PyTorch's convention),
            or None for a cumulative moving average.
        dtype: dtype of gamma, beta and the running estimates (float64 by default).

    Example::

        >>> import numpy as np, batchnorm
        >>> bn = batchnorm.BatchNorm(3)
        >>> y = bn.forward(np.random.default_rng(0).normal(5.0, 2.0, (8, 3, 4, 4)))
        >>> bool(abs(y.mean()) < 1e-12), bn.backward(np.ones_like(y)).shape
        (True, (8, 3, 4, 4))
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        dtype: np.dtype | type = np.float64,
    ) -> None:
        if (
            isinstance(num_features, bool)
            or not isinstance(num_features, (int, np.integer))
            or num_features < 1
        ):
            raise ValueError(
                f"BatchNorm: num_features must be a positive int (the channel count C of axis 1), "
                f"got {num_features!r}"
            )
        _check_eps(eps)
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(
                f"BatchNorm: momentum must be in [0, 1] (weight of the new batch, PyTorch's convention) "
                f"or None (cumulative average), got {momentum!r}; for Keras' 0.99 use 0.01"
            )
        dtype = np.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"BatchNorm: dtype must be a floating dtype, got {dtype}; use np.float64")
        self.num_features = int(num_features)
        self.eps = eps
        self.momentum = momentum
        self.gamma = np.ones(num_features, dtype)
        self.beta = np.zeros(num_features, dtype)
        self.dgamma = np.zeros(num_features, dtype)
        self.dbeta = np.zeros(num_features, dtype)
        self.running_mean = np.zeros(num_features, dtype)
        self.running_var = np.ones(num_features, dtype)
        self.num_batches_tracked = 0
        self._saved: _Saved | None = None

    def __repr__(self) -> str:
        return f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum})"

    def forward(self, x: np.ndarray, training: bool = True) -> np.ndarray:
        """Normalize ``x`` with the batch statistics (training) or the running ones (prediction).

        Training also updates ``running_mean``, ``running_var`` and ``num_batches_tracked``.
        An empty batch (N = 0) returns an empty output and changes nothing.
        """
        x = self._check_input(x, "x")
        if x.shape[0] == 0:
            return np.empty_like(x)
        if not training:
            invstd = 1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)
            y = kernels.normalize(x, self.running_mean, invstd, self.gamma, self.beta)
            self._saved = _Saved(x, self.running_mean.astype(np.float64), invstd, False)
            return y
        count = x.size // self.num_features
        if count < 2:
            raise ValueError(
                f"BatchNorm: training needs more than 1 value per channel, got input of shape {x.shape} "
                f"(1 value per channel, so the batch variance is 0 and the unbiased one undefined); "
                "use a batch of 2 or more (drop_last=True in the DataLoader drops a trailing batch of 1), "
                "forward(x, training=False), or freeze the layer"
            )
        _check_eps(self.eps)
        # float64 statistics: backward forms x_hat from this mean (see kernels.forward_train)
        y, mean, var, invstd = kernels.forward_train(x, self.gamma, self.beta, self.eps, stats64=True)
        factor = momentum_factor(self.momentum, self.num_batches_tracked + 1)
        stats_dtype = np.float64 if x.dtype == np.float64 else np.float32
        new_mean, new_var = update_running(  # from the statistics in x's precision, as before
            self.running_mean,
            self.running_var,
            mean.astype(stats_dtype).astype(np.float64),
            var.astype(stats_dtype).astype(np.float64),
            count,
            factor,
        )
        self.running_mean = new_mean.astype(self.running_mean.dtype)
        self.running_var = new_var.astype(self.running_var.dtype)
        self.num_batches_tracked += 1
        self._saved = _Saved(x, mean, invstd, True)
        return y

    __call__ = forward

    def backward(self, dout: np.ndarray) -> np.ndarray:
        """dL/dx for the last ``forward``; stores dL/dgamma in ``dgamma`` and dL/dbeta in ``dbeta``."""
        if self._saved is None:
            raise ValueError("BatchNorm.backward: no forward to differentiate; call forward(x) first")
        x, mean, invstd, training = self._saved
        dout = self._check_input(dout, "dout")
        if dout.shape != x.shape:
            raise ValueError(
                f"BatchNorm.backward: dout must have the last forward input's shape {x.shape}, "
                f"got {dout.shape}; pass dL/dy for that forward's output"
            )
        if training:
            dx, dgamma, dbeta = kernels.backward(dout, x, mean, invstd, self.gamma)
        else:
            # Running statistics are constants here: only the affine map x -> y is differentiated.
            dbeta, dgamma = kernels.backward_reduce(dout, x, mean, invstd)
            dx = kernels.normalize(dout, np.zeros_like(invstd), invstd, self.gamma, None)
        self.dgamma = dgamma.astype(self.gamma.dtype)
        self.dbeta = dbeta.astype(self.beta.dtype)
        return dx

    def _check_input(self, x: np.ndarray, name: str) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype.kind != "f":
            raise TypeError(
                f"BatchNorm: {name} must be a floating-point array, got dtype {x.dtype}; "
                f"convert it first, e.g. {name}.astype(np.float32)"
            )
        if x.ndim < 2:
            raise ValueError(
                f"BatchNorm: {name} must be (N, C) or (N, C, *spatial), got {x.ndim}-D shape {x.shape}; "
                f"for a single sample add the batch axis with {name}[None]"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm: {name} must have num_features={self.num_features} channels on axis 1, "
                f"got shape {x.shape} with {x.shape[1]}; channels go on axis 1 (channels-first), "
                "move them with np.moveaxis(x, -1, 1) if they are last"
            )
        return x


def _check_eps(eps: float) -> None:
    if not eps > 0:
        raise ValueError(
            f"BatchNorm: eps must be > 0 (it keeps 1/sqrt(var + eps) finite for a constant channel), "
            f"got {eps!r}; the usual value is 1e-5"
        )
