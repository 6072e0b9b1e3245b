"""Batch norm fused with its activation: ``BatchNormAct1d`` and ``BatchNormAct2d``.

.. math::

    y = \\mathrm{act}(\\gamma (x - \\mathrm{E}[x]) / \\sqrt{\\mathrm{Var}[x] + \\epsilon} + \\beta)

with ``act`` one of ``identity``, ``relu``, ``leaky_relu`` (``negative_slope``) and ``silu``.
The forward reads x for the statistics and once more to write y; the backward reads x and dy
for its two sums and once more to write dx: the activation and its derivative cost no extra
pass over memory (``kernels/act.py``).

``save_memory=True`` keeps only the output y for backward (InPlace-ABN, Rota Bulo et al.
2018): ``z = act^-1(y)`` and ``x_hat = (z - beta) / gamma``. The next layer usually keeps y
anyway, so a BN + activation pair then holds no activation memory of its own. Only invertible
activations (identity, leaky_relu with slope > 0) qualify, and every gamma must be nonzero.
Because y is saved, modifying it in place before backward is an error (torch reports it).

Statistics and running estimates are exactly those of ``torch.nn.BatchNorm*d``: biased batch
variance for normalization, unbiased for ``running_var``, ``running <- (1 - momentum) running +
momentum batch`` (``momentum=None``: cumulative average); the state_dict is BatchNorm's, so
checkpoints move between the two.

CPU tensors run the numba kernels; other devices (CUDA) run ``torch.nn.functional.batch_norm``
followed by the activation (same semantics, not fused); so does eval mode when autograd is
recording (fine-tuning through frozen statistics), where the fused kernel would save nothing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchnorm.kernels import _act_dispatch as _kernels
from batchnorm.nn.batchnorm import BatchNormBase

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "batch_norm_act"]

ACTIVATIONS = tuple(_kernels.ACTIVATIONS)


def _numpy(t: Tensor | None, dtype: torch.dtype) -> Any:
    if t is None:
        return None
    t = t.detach()
    return (t if t.dtype == dtype else t.to(dtype)).numpy()


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tensor(a: Any, dtype: torch.dtype) -> Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


class _BatchNormActFunction(torch.autograd.Function):
    """Training-mode BN + activation on the CPU kernels; returns ``(y, mean, var)``."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, save_memory):  # type: ignore[override]
        cd = _compute_dtype(x)
        y, mean, var, invstd = _kernels.forward_train(
            _numpy(x, cd), _numpy(weight, cd), _numpy(bias, cd), eps, act, slope
        )
        y = _tensor(y, x.dtype)
        mean, var, invstd = (torch.from_numpy(a) for a in (mean, var, invstd))
        ctx.save_for_backward(y if save_memory else x, weight, bias, mean, invstd)
        ctx.config = (act, slope, save_memory)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy, _dmean, _dvar):  # type: ignore[override]
        saved, weight, bias, mean, invstd = ctx.saved_tensors
        act, slope, from_output = ctx.config
        cd = _compute_dtype(saved)
        dx, dweight, dbias = _kernels.backward(
            _numpy(dy, cd), _numpy(saved, cd), mean.numpy(), invstd.numpy(),
            _numpy(weight, cd), _numpy(bias, cd), act, slope, from_output,
        )
        need = ctx.needs_input_grad
        dx = _tensor(dx, saved.dtype) if need[0] else None
        dweight = _tensor(dweight, weight.dtype) if weight is not None and need[1] else None
        dbias = _tensor(dbias, bias.dtype) if bias is not None and need[2] else None
        return dx, dweight, dbias, None, None, None, None


def _activate(z: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, slope)
    if act == "silu":
        return F.silu(z)
    return z


def batch_norm_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "relu",
    negative_slope: float = 0.01,
    save_memory: bool = False,
) -> Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Same arguments and running-statistics update as ``torch.nn.functional.batch_norm``
    (``momentum`` is the weight of the new batch), fused on CPU. ``save_memory`` keeps only
    the output for backward (identity and leaky_relu only).

    Shape:
        x, output: ``(N, C, *spatial)``; running stats, weight, bias: ``(C,)``.
    """
    _kernels._act_code(act, negative_slope)
    if save_memory:
        _check_save_memory(act, negative_slope, weight)
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean/running_var: required when training=False, got None; "
                             "pass training=True to use batch statistics")
        recording = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)
        )
        if x.device.type != "cpu" or recording:
            z = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
            return _activate(z, act, negative_slope)
        cd = _compute_dtype(x)
        y = _kernels.forward_inference(
            _numpy(x, cd), _numpy(weight, cd), _numpy(bias, cd),
            _numpy(running_mean, torch.float64), _numpy(running_var, torch.float64),
            eps, act, negative_slope,
        )
        return _tensor(y, x.dtype)
    if x.numel() == 0:  # an empty batch: nothing to normalize, no statistics to update
        return _activate(x * 1.0, act, negative_slope)
    count = x.numel() // max(1, x.shape[1])
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}; "
            "use a batch of at least 2 samples, or eval mode"
        )
    if x.device.type != "cpu":
        z = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        return _activate(z, act, negative_slope)
    y, mean, var = _BatchNormActFunction.apply(x, weight, bias, eps, act, negative_slope, save_memory)
    if running_mean is not None and running_var is not None:
        with torch.no_grad():
            # Bessel's correction: the running estimate is of the population variance.
            unbiased = var * (count / (count - 1))
            running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1.0 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    return y


def _check_save_memory(act: str, slope: float, weight: Tensor | None) -> None:
    if act not in _kernels.INVERTIBLE:
        raise ValueError(
            f"save_memory=True: x_hat is recovered from the output only for invertible activations "
            f"{_kernels.INVERTIBLE}, got act={act!r}; use save_memory=False, or act='leaky_relu'"
        )
    if act == "leaky_relu" and slope <= 0:
        raise ValueError(f"save_memory=True: negative_slope must be > 0 to invert leaky_relu, got {slope}")
    if weight is not None and bool((weight == 0).any()):
        zeros = torch.nonzero(weight == 0).flatten()[:8].tolist()
        raise ValueError(
            f"save_memory=True: recovering x_hat divides by weight (gamma), which is 0 at channels "
            f"{zeros}; use save_memory=False or reinitialise those weights"
        )


class _BatchNormActMixin(BatchNormBase):
    """BatchNorm's checks, parameters, buffers and state_dict (``BatchNormBase``), plus an
    activation fused into the kernels."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        act: str = "relu",
        negative_slope: float = 0.01,
        save_memory: bool = False,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        _kernels._act_code(act, negative_slope)
        if save_memory:
            _check_save_memory(act, negative_slope, None)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)  # type: ignore[call-arg]
        self.act = act
        self.negative_slope = negative_slope
        self.save_memory = save_memory

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", act={self.act!r}"  # type: ignore[misc]
        if self.act == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text + (", save_memory=True" if self.save_memory else "")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's argument name
        self._check_input(input)
        use_batch_stats = self._use_batch_stats()
        save_memory = self.save_memory and use_batch_stats
        if save_memory:
            _check_save_memory(self.act, self.negative_slope, self.weight)
        tracks = self._tracks_this_batch()
        running_mean, running_var = self._running_buffers()
        y = batch_norm_act(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            self._momentum_factor() if tracks else 0.0,
            self.eps,
            self.act,
            self.negative_slope,
            save_memory,
        )
        # counted only once the update has happened, so a raising forward changes nothing
        if tracks and input.numel() > 0:
            self._count_batch()
        return y


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``act(BatchNorm1d(x))`` fused, on ``(N, C)`` or ``(N, C, L)`` inputs.

    Args: ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    ``device``, ``dtype`` as ``torch.nn.BatchNorm1d``; ``act`` in
    ``identity | relu | leaky_relu | silu``; ``negative_slope`` for leaky_relu;
    ``save_memory`` keeps only the output for backward (identity, leaky_relu).

    Shape:
        input and output: ``(N, C)`` or ``(N, C, L)``.

    Example::

        >>> import torch, batchnorm.nn
        >>> batchnorm.nn.BatchNormAct1d(16, act="silu")(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``act(BatchNorm2d(x))`` fused, on ``(N, C, H, W)`` inputs (NCHW or channels-last).

    Args: ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    ``device``, ``dtype`` as ``torch.nn.BatchNorm2d``; ``act`` in
    ``identity | relu | leaky_relu | silu``; ``negative_slope`` for leaky_relu;
    ``save_memory`` keeps only the output for backward (identity, leaky_relu).

    Shape:
        input and output: ``(N, C, H, W)``; the output keeps the input's memory format.

    Example::

        >>> import torch, batchnorm.nn
        >>> batchnorm.nn.BatchNormAct2d(16)(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
    """
