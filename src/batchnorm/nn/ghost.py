"""Ghost Batch Normalization (Hoffer, Hubara & Soudry, 2017): BN over virtual batches.

In training the batch is cut along N into consecutive chunks of ``virtual_batch_size``
samples (the last chunk may be smaller) and each chunk ``j`` is normalized with its own
statistics over its ``n_j = N_j * prod(spatial)`` values::

    mean_j  = 1/n_j sum_{i in j} x_i
    var_j   = 1/n_j sum_{i in j} (x_i - mean_j)^2
    y_i     = gamma * (x_i - mean_j) / sqrt(var_j + eps) + beta        for i in chunk j

so a large batch keeps the regularizing noise of small-batch statistics. The gradient of a
sample only flows through its own chunk's statistics (each chunk is an independent BN).

Running statistics: ONE momentum update per step, from the chunks pooled::

    mean   = sum_j n_j mean_j / n                     (= the whole batch's mean)
    var_u  = sum_j n_j var_j / (n - k)                (pooled within-chunk variance, unbiased)
    running <- (1 - momentum) * running + momentum * (mean, var_u)

Why pooled, not one update per chunk: ``momentum`` and ``num_batches_tracked`` (and
``momentum=None``'s cumulative average) keep exactly BatchNorm's meaning - one update per
optimizer step, whatever the number of chunks - and a chunk's position in the batch does not
change its weight. ``var_u`` estimates the variance *within* a virtual batch, which is what
the network is normalized with in training (the spread of the chunk means is not included);
with one chunk it is BatchNorm's ``var * n / (n - 1)``. Eval is exactly BatchNorm.

Shape:
    GhostBatchNorm1d: ``(N, C)`` or ``(N, C, L)``; GhostBatchNorm2d: ``(N, C, H, W)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from batchnorm import _torch_ops as ops
from batchnorm import functional
from batchnorm.nn.batchnorm import BatchNormBase, torch_bias_kwarg

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "ghost_batch_norm"]


def _writes_in_place(x: Tensor) -> bool:
    """True when the chunks can run the numba kernels writing straight into the output's
    slices (``out=`` on NumPy views): CPU tensors on the numba backend in float32/float64.
    Otherwise (CUDA, Triton backend, half precision) each chunk's result is copied in."""
    return x.dtype in (torch.float32, torch.float64) and ops._backend(x) is None


def _np(t: Tensor | None):  # type: ignore[no-untyped-def]
    return None if t is None else t.detach().numpy()


def _forward_chunk(x_j: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, y_j: Tensor):
    """BN of one chunk into ``y_j``; returns ``(mean_j, var_j, invstd_j)``, in float64 on the
    numba kernels (the backward forms x_hat from this mean: see kernels.forward_train)."""
    if _writes_in_place(x_j):
        from batchnorm import kernels

        _, mean, var, invstd = kernels.forward_train(
            _np(x_j), _np(weight), _np(bias), eps, out=y_j.numpy(), stats64=True
        )
        return torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(invstd)
    out_j, mean, var, invstd = ops.forward_train(x_j, weight, bias, eps)
    y_j.copy_(out_j)
    return mean, var, invstd


def _backward_chunk(
    dy_j: Tensor, x_j: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, dx_j: Tensor
):
    """BN backward of one chunk, dx into ``dx_j``; returns ``(dweight_j, dbias_j)``."""
    if _writes_in_place(x_j):
        from batchnorm import kernels

        _, dweight, dbias = kernels.backward(
            _np(dy_j), _np(x_j), _np(mean), _np(invstd), _np(weight), out=dx_j.numpy()
        )
        return torch.from_numpy(dweight), torch.from_numpy(dbias)
    dx_c, dweight, dbias = ops.backward(dy_j, x_j, mean, invstd, weight)
    dx_j.copy_(dx_c)
    return dweight, dbias


class _GhostBatchNormFunction(torch.autograd.Function):
    """Training-mode ghost BN: each chunk along N is an independent BN on the kernels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        eps: float,
        momentum: float,
        virtual_batch_size: int,
    ) -> Tensor:
        y = torch.empty_like(x)
        means, invstds, m2_sum, count = [], [], None, 0
        for x_j, y_j in zip(x.split(virtual_batch_size), y.split(virtual_batch_size), strict=True):
            mean_j, var_j, invstd_j = _forward_chunk(x_j, weight, bias, eps, y_j)
            n_j = x_j.numel() // x_j.shape[1]
            m2_j = var_j.to(torch.float64) * n_j
            m2_sum = m2_j if m2_sum is None else m2_sum + m2_j
            count += n_j
            means.append(mean_j)
            invstds.append(invstd_j)
        mean_all = torch.stack(means)
        if running_mean is not None and running_var is not None and m2_sum is not None:
            counts = torch.tensor(
                [x_j.numel() // x.shape[1] for x_j in x.split(virtual_batch_size)],
                dtype=torch.float64,
                device=x.device,
            )
            mean = (counts.unsqueeze(1) * mean_all.to(torch.float64)).sum(0) / count
            var_u = m2_sum / (count - len(means))
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(var_u.to(running_var.dtype), alpha=momentum)
        ctx.save_for_backward(x, weight, mean_all, torch.stack(invstds))
        ctx.virtual_batch_size = virtual_batch_size
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, means, invstds = ctx.saved_tensors
        v = ctx.virtual_batch_size
        dx = torch.empty_like(x)
        dweight = torch.zeros_like(means[0])
        dbias = torch.zeros_like(means[0])
        for j, (x_j, dy_j, dx_j) in enumerate(zip(x.split(v), dy.split(v), dx.split(v), strict=True)):
            dweight_c, dbias_c = _backward_chunk(dy_j, x_j, means[j], invstds[j], weight, dx_j)
            dweight += dweight_c  # dgamma = sum over every chunk of sum dy x_hat_j
            dbias += dbias_c
        needs = ctx.needs_input_grad
        return (
            dx if needs[0] else None,
            dweight.to(weight.dtype) if weight is not None and needs[1] else None,
            dbias.to(weight.dtype) if ctx.has_bias and needs[2] else None,
            None,
            None,
            None,
            None,
            None,
        )


def _check_virtual_batch_size(virtual_batch_size: Any, where: str) -> int:
    if (
        isinstance(virtual_batch_size, bool)
        or not isinstance(virtual_batch_size, int)
        or virtual_batch_size < 1
    ):
        raise ValueError(
            f"{where}: virtual_batch_size must be a positive int (samples per ghost batch), got "
            f"{virtual_batch_size!r}; typical values are 16 to 128"
        )
    return virtual_batch_size


def ghost_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    virtual_batch_size: int,
    momentum: float = 0.1,
    eps: float = 1e-5,
    where: str = "ghost_batch_norm",
) -> Tensor:
    """Training-mode ghost BN of ``x``; the running buffers, if given, are updated in place.

    Formulas in the module docstring. Raises ValueError, before any update, if a chunk has
    a single value per channel (its variance would be 0).

    Shape:
        x, output: ``(N, C, *spatial)``; running_mean, running_var, weight, bias: ``(C,)``.
    """
    _check_virtual_batch_size(virtual_batch_size, where)
    probe = x.narrow(0, 0, 0) if x.dim() >= 2 else x
    functional.check_args(probe, running_mean, running_var, weight, bias, True, momentum, eps, where=where)
    n = x.shape[0]
    if x.numel() == 0:  # no values (N = 0 or an empty spatial extent): nothing to normalize or update
        return functional.batch_norm(x, None, None, weight, bias, True, momentum, eps)
    per_sample = x.numel() // (n * x.shape[1]) if x.shape[1] else 0
    last = n - (n - 1) // virtual_batch_size * virtual_batch_size
    if min(last, virtual_batch_size) * per_sample <= 1:
        raise ValueError(
            f"{where}: a ghost batch would hold 1 value per channel (batch of {n} samples, "
            f"virtual_batch_size={virtual_batch_size}, last chunk of {last}, input shape "
            f"{tuple(x.shape)}), and its variance would be 0; choose a virtual_batch_size that "
            "does not leave a single-sample last chunk, or use drop_last=True in the DataLoader"
        )
    return _GhostBatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, eps, momentum, virtual_batch_size
    )


class _GhostBatchNorm(BatchNormBase):
    """Shared body of GhostBatchNorm1d/2d (mixed in before the torch class)."""

    def __init__(
        self,
        num_features: int,
        virtual_batch_size: int = 32,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        self.virtual_batch_size = _check_virtual_batch_size(virtual_batch_size, type(self).__name__)
        torch_base = torch_bias_kwarg(bias, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **torch_base
        )  # type: ignore[call-arg]

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}"  # type: ignore[misc]

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's parameter name
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}"
            )
        if not self.training:
            return super().forward(input)  # eval is exactly BatchNorm
        self._check_input_dim(input)
        self._check_channels(input)
        running_mean, running_var = self._running_buffers()
        y = ghost_batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            self.virtual_batch_size,
            self._momentum_factor(),
            self.eps,
            where=type(self).__name__,
        )
        if self._tracks_this_batch() and input.numel() > 0:  # as BatchNorm: no values, no update
            self._count_batch()
        return y


class GhostBatchNorm1d(_GhostBatchNorm, torch.nn.BatchNorm1d):
    """Ghost BN over ``(N, C)`` or ``(N, C, L)`` input: chunks of ``virtual_batch_size``
    samples normalized separately in training, BatchNorm1d in eval (module docstring).

    Args: ``num_features``, ``virtual_batch_size`` (samples per ghost batch), then ``eps``,
    ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype`` and the
    keyword-only ``bias`` as ``torch.nn.BatchNorm1d``.
    """


class GhostBatchNorm2d(_GhostBatchNorm, torch.nn.BatchNorm2d):
    """Ghost BN over ``(N, C, H, W)`` input: chunks of ``virtual_batch_size`` samples
    normalized separately in training, BatchNorm2d in eval (module docstring).

    Args: ``num_features``, ``virtual_batch_size`` (samples per ghost batch), then ``eps``,
    ``momentum``, ``affine``, ``track_running_stats``, ``device``, ``dtype`` and the
    keyword-only ``bias`` as ``torch.nn.BatchNorm2d``.
    """
