"""SyncBatchNormAct: SyncBatchNorm fused with an activation.

``y = act(z)``, ``z = gamma * (x - mean) * invstd + beta`` with the global statistics of
SyncBatchNorm, fused exactly as BatchNormAct does: ``dz = dy * act'(z)`` replaces ``dy`` in the
backward's two sums and in dx, with the same two collectives as SyncBatchNorm (one all_gather
forward, one all_reduce between the backward's two passes). ``save_memory`` keeps only y and
recovers ``x_hat`` from it in backward.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from batchnorm.nn import act as act_ops
from batchnorm.nn.sync import SyncBatchNorm, all_reduce_sums

__all__ = ["SyncBatchNormAct"]


class _SyncBatchNormActFunction(torch.autograd.Function):
    """``y = act(gamma * (x - mean) * invstd + beta)`` with the global statistics, fused; its
    backward holds the one all_reduce, between the two fused backward passes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        mean: Tensor,
        invstd: Tensor,
        count: int,
        group: Any,
        act: str,
        slope: float,
        save_memory: bool,
    ) -> Tensor:
        if x.numel() == 0:
            y = torch.empty_like(x)
        else:
            y = act_ops.normalize_act(x, mean, invstd, weight, bias, act, slope)
        ctx.save_for_backward(y if save_memory else x, weight, bias, mean, invstd)
        ctx.count, ctx.group, ctx.config = count, group, (act, slope, save_memory)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved, weight, bias, mean, invstd = ctx.saved_tensors
        act, slope, from_output = ctx.config
        fused = (weight, bias, act, slope, from_output)
        if saved.numel() == 0:
            sum_dz = torch.zeros(mean.shape, dtype=torch.float64, device=mean.device)
            sum_dz_xhat = torch.zeros_like(sum_dz)
        else:
            sum_dz, sum_dz_xhat = act_ops.backward_reduce_act(dy, saved, mean, invstd, *fused)
        dx = None
        if ctx.needs_input_grad[0]:
            g_sum_dz, g_sum_dz_xhat = sum_dz, sum_dz_xhat
            if ctx.group is not None:
                # float64 sums: the fused dx kernel reads them at that precision
                g_sum_dz, g_sum_dz_xhat = all_reduce_sums(sum_dz, sum_dz_xhat, ctx.group, torch.float64)
            if saved.numel() == 0:
                dx = torch.empty_like(saved)
            else:
                dx = act_ops.backward_dx_act(
                    dy, saved, mean, invstd, *fused, g_sum_dz, g_sum_dz_xhat, ctx.count
                )
        # Local parameter gradients: DDP's gradient all_reduce makes them global.
        needs = ctx.needs_input_grad
        dweight = sum_dz_xhat.to(weight.dtype) if weight is not None and needs[1] else None
        dbias = sum_dz.to(bias.dtype) if bias is not None and needs[2] else None
        return dx, dweight, dbias, None, None, None, None, None, None, None


class SyncBatchNormAct(SyncBatchNorm):
    """SyncBatchNorm fused with an activation: what ``convert_sync_batchnorm`` makes of a
    ``BatchNormAct*d``, so the activation (and ``save_memory``) is kept.

    ``y = act(SyncBatchNorm(x))`` with ``act`` a name as in ``batchnorm.nn.BatchNormAct*d``
    (``identity``, ``relu``, ``leaky_relu`` with ``negative_slope``, ``silu``): fused into the
    normalize pass and into both backward passes (``dz = dy * act'(z)``), with SyncBatchNorm's
    two collectives, so it equals BatchNormAct on the concatenated global batch.
    ``save_memory=True`` keeps only y for backward (identity and leaky_relu; nonzero weight).
    ``act`` may also be any ``nn.Module`` (timm-style BN+act layers hold one): it then runs
    after the synchronized normalize, unfused. Same attributes and state_dict as the layer it
    replaces.

    Shape:
        - Input: ``(N_r, C, *)`` on each rank, ``N_r >= 0``
        - Output: same shape (and memory format) as the input
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any | None = None,
        act: str | torch.nn.Module = "relu",
        negative_slope: float = 0.01,
        save_memory: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        name = type(self).__name__
        if isinstance(act, str):
            if act not in act_ops.ACTIVATIONS:
                raise ValueError(
                    f"{name}: act must be one of {sorted(act_ops.ACTIVATIONS)} or an nn.Module, got {act!r}"
                )
            if save_memory:
                act_ops._check_save_memory(act, negative_slope, None)
        elif not isinstance(act, torch.nn.Module):
            raise TypeError(
                f"{name}: act must be an activation name or an nn.Module, got {type(act).__name__}"
            )
        elif save_memory:
            raise ValueError(
                f"{name}: save_memory=True needs a named invertible activation (identity, leaky_relu), "
                f"got the module {type(act).__name__}; use save_memory=False"
            )
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias=bias
        )
        self.act = act
        self.negative_slope = negative_slope
        self.save_memory = save_memory

    def extra_repr(self) -> str:
        if not isinstance(self.act, str):
            return super().extra_repr()
        text = f"{super().extra_repr()}, act={self.act!r}"
        text += f", negative_slope={self.negative_slope}" if self.act == "leaky_relu" else ""
        return text + (", save_memory=True" if self.save_memory else "")

    def _fused_act(self) -> tuple[str, float, bool] | None:
        if not isinstance(self.act, str):
            return None
        if self.save_memory:
            act_ops._check_save_memory(self.act, self.negative_slope, self.weight)
        return self.act, self.negative_slope, self.save_memory

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002
        if not isinstance(self.act, str):
            return self.act(super().forward(input))
        if isinstance(input, Tensor) and not self._use_batch_stats():
            # eval: BatchNormAct on the running estimates (fused), no communication
            self._check_input(input)
            return act_ops._batch_norm_act(
                input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                self.eps, self.act, self.negative_slope, False,
            )  # fmt: skip
        return super().forward(input)
