"""Batch Renormalization (Ioffe, 2017): BN whose training output is corrected toward the
running statistics, so small or non-i.i.d. batches train what eval computes.

In training, with the batch statistics ``mean_B``, ``var_B`` and the running ones
``running_mean``, ``running_var`` *before* this step's update::

    sigma_B = sqrt(var_B + eps)                 sigma = sqrt(running_var + eps)
    r       = clip(sigma_B / sigma, 1 / r_max, r_max)
    d       = clip((mean_B - running_mean) / sigma, -d_max, d_max)
    x_hat   = (x - mean_B) / sigma_B
    y       = gamma * (x_hat * r + d) + beta

``r`` and ``d`` are constants for the backward pass (the paper's ``stop_gradient``): the
gradient is BatchNorm's with ``gamma * r`` in place of ``gamma``, and
``dgamma = r * sum(dy x_hat) + d * sum(dy)``, ``dbeta = sum(dy)``. With ``r = 1, d = 0`` this
is exactly BatchNorm. The running statistics are then updated as in BatchNorm (torch's
momentum convention, unbiased variance). Eval is exactly BatchNorm.

Warm-up: early in training the running statistics are meaningless, so the limits start at
``r_max = 1, d_max = 0`` (plain BN) and grow linearly to their final values over
``warmup_steps`` training steps (the paper keeps BN for 5k steps, then relaxes the limits
over tens of thousands; ``warmup_steps=0`` uses the final limits from the first step)::

    t        = min(step / warmup_steps, 1)
    r_max(t) = 1 + (r_max - 1) * t,   d_max(t) = d_max * t

The step count is the buffer ``renorm_step`` (saved in the state_dict, separate from
``num_batches_tracked`` so recalibrated or converted BN statistics do not skip the warm-up).
A BatchNorm checkpoint without it loads with ``renorm_step = 0``.

Shape:
    BatchRenorm1d: ``(N, C)`` or ``(N, C, L)``; BatchRenorm2d: ``(N, C, H, W)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from batchnorm import _torch_ops as ops
from batchnorm import functional
from batchnorm.nn.batchnorm import BatchNormBase, torch_bias_kwarg

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "batch_renorm", "renorm_limits"]


def renorm_limits(step: int, r_max: float, d_max: float, warmup_steps: int) -> tuple[float, float]:
    """``(r_max(t), d_max(t))`` at training step ``step`` (0 = the first), linear warm-up."""
    t = 1.0 if warmup_steps <= 0 else min(step / warmup_steps, 1.0)
    return 1.0 + (r_max - 1.0) * t, d_max * t


class _BatchRenormFunction(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor,
        running_var: Tensor,
        eps: float,
        momentum: float,
        r_max: float,
        d_max: float,
    ) -> Tensor:
        # float64 statistics on the numba kernels: y and the backward form x - mean from this
        # mean (a float32-rounded one is off by ~6e-8 |mean|, 5% of the std at mean 1e4, std 1e-2)
        mean_b, var_b = ops.channel_stats(x, stats64=True)
        compute = ops._compute_dtype(x)
        sigma_b = torch.sqrt(var_b.to(torch.float64) + eps)
        sigma = torch.sqrt(running_var.to(torch.float64) + eps)
        r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean_b.to(torch.float64) - running_mean.to(torch.float64)) / sigma).clamp(-d_max, d_max)
        gamma = torch.ones_like(r) if weight is None else weight.to(torch.float64)
        beta = torch.zeros_like(r) if bias is None else bias.to(torch.float64)
        # y = gamma (x_hat r + d) + beta = x_hat (gamma r) + (gamma d + beta): one normalize pass
        scale = (gamma * r).to(compute)
        shift = (gamma * d + beta).to(compute)
        invstd = (1.0 / sigma_b).to(mean_b.dtype)
        y = ops.normalize(x, mean_b, invstd, scale, shift)
        count = x.numel() // x.shape[1]
        functional.update_running_(
            running_mean,
            running_var,
            mean_b.to(running_mean.dtype),
            var_b.to(running_var.dtype),
            count,
            momentum,
        )
        ctx.save_for_backward(x, weight, mean_b, invstd, scale, r.to(compute), d.to(compute))
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean_b, invstd, scale, r, d = ctx.saved_tensors
        sum_dy, sum_dy_xhat = ops.backward_reduce(dy, x, mean_b, invstd)
        needs = ctx.needs_input_grad
        dx = None
        if needs[0]:
            # dl/dx_hat = dy * gamma * r, then BatchNorm's dx through the batch statistics
            count = x.numel() // x.shape[1]
            dx = ops.backward_dx(dy, x, mean_b, invstd, scale, sum_dy, sum_dy_xhat, count)
        dweight = None
        if weight is not None and needs[1]:
            dweight = (r * sum_dy_xhat + d * sum_dy).to(weight.dtype)  # dl/dgamma = sum dy (x_hat r + d)
        dbias = sum_dy.to(weight.dtype) if ctx.has_bias and needs[2] else None  # dl/dbeta = sum dy
        return dx, dweight, dbias, None, None, None, None, None, None


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    r_max: float,
    d_max: float,
    momentum: float = 0.1,
    eps: float = 1e-5,
    where: str = "batch_renorm",
) -> Tensor:
    """Training-mode Batch Renormalization; updates the running buffers in place (after
    computing ``r`` and ``d`` from their old values). Formulas in the module docstring.

    Shape:
        x, output: ``(N, C, *spatial)``; running_mean, running_var, weight, bias: ``(C,)``.
    """
    if running_mean is None or running_var is None:
        raise ValueError(
            f"{where}: running_mean and running_var are required (r and d are computed from them), got None"
        )
    functional.check_args(x, running_mean, running_var, weight, bias, True, momentum, eps, where=where)
    if x.numel() == 0:  # no values (N = 0 or an empty spatial extent): nothing to normalize or update
        return functional.batch_norm(x, None, None, weight, bias, True, momentum, eps)
    return _BatchRenormFunction.apply(x, weight, bias, running_mean, running_var, eps, momentum, r_max, d_max)


class _BatchRenorm(BatchNormBase):
    """Shared body of BatchRenorm1d/2d (mixed in before the torch class)."""

    renorm_step: Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 5000,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        track_running_stats: bool = True,
    ) -> None:
        name = type(self).__name__
        if not track_running_stats:
            raise ValueError(
                f"{name}: track_running_stats must be True (r and d are computed from the running "
                f"statistics), got {track_running_stats!r}; for batch statistics only use BatchNorm "
                "with track_running_stats=False"
            )
        if not r_max >= 1.0:
            raise ValueError(
                f"{name}: r_max must be >= 1 (r is clipped to [1/r_max, r_max]), got {r_max!r}; "
                "the paper uses 3"
            )
        if not d_max >= 0.0:
            raise ValueError(
                f"{name}: d_max must be >= 0 (d is clipped to [-d_max, d_max]), got {d_max!r}; "
                "the paper uses 5"
            )
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(
                f"{name}: warmup_steps must be an int >= 0 (0 = no warm-up), got {warmup_steps!r}"
            )
        torch_base = torch_bias_kwarg(bias, type(self).__name__)
        super().__init__(num_features, eps, momentum, affine, True, device, dtype, **torch_base)  # type: ignore[call-arg]
        self.r_max, self.d_max, self.warmup_steps = float(r_max), float(d_max), warmup_steps
        self.register_buffer("renorm_step", torch.tensor(0, dtype=torch.long, device=device))

    def limits(self) -> tuple[float, float]:
        """The clipping limits ``(r_max, d_max)`` the next training step will use."""
        return renorm_limits(int(self.renorm_step), self.r_max, self.d_max, self.warmup_steps)

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, r_max={self.r_max}, d_max={self.d_max}, "
            f"warmup_steps={self.warmup_steps}"
        )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:  # type: ignore[no-untyped-def]
        # A BatchNorm checkpoint has no renorm_step: start the warm-up from 0 rather than fail.
        state_dict.setdefault(prefix + "renorm_step", torch.zeros_like(self.renorm_step))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's parameter name
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}"
            )
        if not self.training:
            return super().forward(input)  # eval is exactly BatchNorm
        self._check_input(input)
        r_max, d_max = self.limits()
        y = batch_renorm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            r_max,
            d_max,
            self._momentum_factor(),
            self.eps,
            where=type(self).__name__,
        )
        if input.numel() > 0:  # as BatchNorm: no values, no update, no step
            self._count_batch()
            self.renorm_step.add_(1)
        return y


class BatchRenorm1d(_BatchRenorm, torch.nn.BatchNorm1d):
    """Batch Renormalization over ``(N, C)`` or ``(N, C, L)`` input (module docstring).

    Args: ``num_features``, ``eps``, ``momentum``, ``affine`` as ``torch.nn.BatchNorm1d``;
    ``r_max``, ``d_max``, the final clipping limits; ``warmup_steps``, training steps to reach
    them (0 = at once); ``device``, ``dtype``, and the keyword-only ``bias`` and
    ``track_running_stats`` as torch's (the latter must stay True: r and d need the running
    statistics), so torch's keyword arguments all construct it.
    """


class BatchRenorm2d(_BatchRenorm, torch.nn.BatchNorm2d):
    """Batch Renormalization over ``(N, C, H, W)`` input (module docstring).

    Args: ``num_features``, ``eps``, ``momentum``, ``affine`` as ``torch.nn.BatchNorm2d``;
    ``r_max``, ``d_max``, the final clipping limits; ``warmup_steps``, training steps to reach
    them (0 = at once); ``device``, ``dtype``, and the keyword-only ``bias`` and
    ``track_running_stats`` as torch's (the latter must stay True: r and d need the running
    statistics), so torch's keyword arguments all construct it.
    """
