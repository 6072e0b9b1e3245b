"""SyncBatchNorm: batch statistics reduced across a torch.distributed process group.

In data-parallel training each process sees ``N_r`` of the ``N = sum_r N_r`` samples of a
step. SyncBatchNorm normalizes every process's slice with the statistics of the whole global
batch, so the result is exactly BatchNorm on the concatenated batch::

    forward   (n_r, mean_r, M2_r) = local channel_stats          M2_r = n_r * var_r
              one all_gather of (n_r, mean_r, M2_r) from every rank
              n    = sum_r n_r
              mean = sum_r n_r mean_r / n                         (Chan et al., 1979)
              var  = (sum_r M2_r + sum_r n_r (mean_r - mean)^2) / n
              y    = gamma * (x - mean) / sqrt(var + eps) + beta
    backward  (sum_dy, sum_dy_xhat) = local backward_reduce
              one all_reduce(SUM) of (sum_dy, sum_dy_xhat)
              dx     = gamma * invstd * (dy - sum_dy / n - x_hat * sum_dy_xhat / n)
              dgamma = local sum_dy_xhat,  dbeta = local sum_dy   (DDP sums/averages them)

SyncBatchNormAct (``nn/sync_act.py``) fuses an activation into both passes with the same
two collectives.

Works on any backend (gloo on CPU, nccl on GPU, mpi): PyTorch's own ``torch.nn.SyncBatchNorm``
refuses CPU tensors. The local reductions and the normalization run on the project's kernels
(``batchnorm._torch_ops``); the only per-channel work in Python is the vectorized combine.

Numerical choices: the statistics travel and combine in float64 whatever the input dtype
(``2C + 1`` numbers per rank, so the cost is nil) and the combine uses Chan's pairwise form
(per-rank ``M2`` plus the spread of the rank means) rather than summing ``x`` and ``x^2``,
which loses every digit when ``|mean| >> std``.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from batchnorm import _torch_ops as ops
from batchnorm import functional
from batchnorm.nn import act as act_ops
from batchnorm.nn.batchnorm import BatchNormBase, torch_bias_kwarg

__all__ = ["SyncBatchNorm", "combine_stats", "sync_batch_norm"]

# "behaves as BatchNorm and says so once": once per process, not once per layer.
_warned_no_group = False


def combine_stats(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Chan's parallel combination of per-rank statistics.

    ``n = sum_r n_r``; ``mean = sum_r n_r mean_r / n``;
    ``var = (sum_r M2_r + sum_r n_r (mean_r - mean)^2) / n`` (biased). Ranks with ``n_r = 0``
    contribute nothing. Returns ``(n, mean, var)`` with ``n`` a 0-d tensor.

    Shape:
        counts: ``(R,)``; means, m2s: ``(R, C)``; returns ``()``, ``(C,)``, ``(C,)``.
    """
    n = counts.sum()
    weights = (counts / n.clamp(min=1)).unsqueeze(1)
    mean = (weights * means).sum(0)
    spread = (counts.unsqueeze(1) * (means - mean) ** 2).sum(0)
    var = (m2s.sum(0) + spread) / n.clamp(min=1)
    return n, mean, var


def _local_stats(x: Tensor) -> tuple[int, Tensor, Tensor]:
    """``(count, mean, var)`` of this rank's slice; an empty slice gives zeros."""
    channels = x.shape[1]
    count = x.numel() // channels if channels else 0
    if count == 0:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        zeros = torch.zeros(channels, dtype=dtype, device=x.device)
        return 0, zeros, zeros.clone()
    mean, var = ops.channel_stats(x)
    return count, mean, var


def _global_stats(x: Tensor, group: Any, world_size: int) -> tuple[int, Tensor, Tensor]:
    """One all_gather of ``(n_r, mean_r, M2_r)`` then the combine; identical on every rank."""
    count, mean, var = _local_stats(x)
    packed = torch.cat(
        [
            torch.tensor([float(count)], dtype=torch.float64, device=x.device),
            mean.to(torch.float64),
            var.to(torch.float64) * count,
        ]
    )
    gathered = [torch.empty_like(packed) for _ in range(world_size)]
    dist.all_gather(gathered, packed, group=group)
    table = torch.stack(gathered)
    channels = x.shape[1]
    n, g_mean, g_var = combine_stats(table[:, 0], table[:, 1 : 1 + channels], table[:, 1 + channels :])
    return int(n.item()), g_mean, g_var


def all_reduce_sums(a: Tensor, b: Tensor, group: Any, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """The backward's one collective: both per-channel sums summed over ``group`` in a single
    float64 buffer (exact for any realistic count), returned in ``dtype``."""
    packed = torch.cat([a, b]).to(torch.float64)
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    first, second = packed.to(dtype).chunk(2)
    return first, second


class _SyncBatchNormFunction(torch.autograd.Function):
    """``y = gamma * (x - mean) * invstd + beta`` with the global statistics; its backward
    holds the one all_reduce."""

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
    ) -> Tensor:
        y = torch.empty_like(x) if x.numel() == 0 else ops.normalize(x, mean, invstd, weight, bias)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.count, ctx.group = count, group
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, mean, invstd = ctx.saved_tensors
        if x.numel() == 0:
            sum_dy = torch.zeros_like(mean)
            sum_dy_xhat = torch.zeros_like(mean)
        else:
            sum_dy, sum_dy_xhat = ops.backward_reduce(dy, x, mean, invstd)
        dx = None
        if ctx.needs_input_grad[0]:
            g_sum_dy, g_sum_dy_xhat = sum_dy, sum_dy_xhat
            if ctx.group is not None:
                g_sum_dy, g_sum_dy_xhat = all_reduce_sums(sum_dy, sum_dy_xhat, ctx.group, mean.dtype)
            if x.numel() == 0:
                dx = torch.empty_like(x)
            else:
                dx = ops.backward_dx(dy, x, mean, invstd, weight, g_sum_dy, g_sum_dy_xhat, ctx.count)
        # Local parameter gradients: DDP's gradient all_reduce makes them global.
        dweight = sum_dy_xhat.to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        dbias = sum_dy.to(ctx.bias_dtype) if ctx.bias_dtype is not None and ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None, None, None


def _sync_train(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    eps: float,
    momentum: float,
    group: Any,
    world_size: int,
    act: tuple[str, float, bool] | None = None,
) -> tuple[Tensor, int]:
    """Training forward over the global batch; returns ``(y, global count per channel)``.

    ``act = (name, negative_slope, save_memory)`` fuses that activation (SyncBatchNormAct).
    """
    if group is None:
        # Nothing to synchronize: exactly the project's BatchNorm (or BatchNormAct).
        if act is not None:
            y = act_ops._batch_norm_act(x, running_mean, running_var, weight, bias, True, momentum, eps, *act)
        else:
            y = functional._batch_norm(
                x, running_mean, running_var, weight, bias, True, momentum, eps, where="SyncBatchNorm"
            )
        return y, x.numel() // x.shape[1]
    with torch.no_grad():
        count, mean, var = _global_stats(x, group, world_size)
    if count == 0:
        # Every rank is empty (the count is global): an empty output and no update, as BatchNorm.
        y = functional._empty_output(x, weight, bias)
        return (y if act is None else act_ops._activate(y, act[0], act[1])), 0
    if count == 1:
        # Every rank sees the same global count, so every rank raises together.
        raise ValueError(
            f"SyncBatchNorm: expected more than 1 value per channel when training, got a global "
            f"batch of 1 value per channel (local input shape {tuple(x.shape)}); use a larger "
            "batch (drop_last=True in the DataLoader) or call .eval()"
        )
    if running_mean is not None and running_var is not None:
        # Bessel's correction with the GLOBAL count, as BN on the whole batch does.
        functional.update_running_(
            running_mean, running_var, mean.to(running_mean.dtype), var.to(running_var.dtype), count, momentum
        )
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    invstd = torch.rsqrt(var + eps).to(compute)  # var is float64 here: one rounding at the end
    if act is not None:
        from batchnorm.nn.sync_act import _SyncBatchNormActFunction  # imported late: sync_act imports us

        y = _SyncBatchNormActFunction.apply(x, weight, bias, mean.to(compute), invstd, count, group, *act)
    else:
        y = _SyncBatchNormFunction.apply(x, weight, bias, mean.to(compute), invstd, count, group)
    return y, count


def sync_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    process_group: Any = None,
) -> Tensor:
    """Functional SyncBatchNorm; ``process_group=None`` normalizes with local statistics only.

    In training, the running statistics (if given) are updated in place from the global
    statistics (formulas in the module docstring); in eval (``training=False``) they
    normalize ``x`` and nothing is communicated. Every rank of the group must call it.

    Shape:
        x: ``(N_r, C, *)``, this rank's slice (``N_r`` may be 0); statistics and parameters ``(C,)``.
    """
    if not training and running_mean is not None and running_var is not None:
        # Prediction is per sample: nothing to synchronize, plain BN on the running estimates.
        return functional.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    world_size = 1 if process_group is None else dist.get_world_size(process_group)
    group = process_group if world_size > 1 else None
    y, _ = _sync_train(
        x,
        weight,
        bias,
        running_mean if training else None,
        running_var if training else None,
        eps,
        momentum,
        group,
        world_size,
    )
    return y


class SyncBatchNorm(BatchNormBase, torch.nn.modules.batchnorm._BatchNorm):
    r"""Batch normalization over the global batch of a data-parallel process group.

    .. math::

        y = \frac{x - \mathrm{E}_{global}[x]}{\sqrt{\mathrm{Var}_{global}[x] + \epsilon}} \gamma + \beta

    where the mean and the biased variance are taken per channel over the samples of *every*
    rank of ``process_group`` (default: the whole world): outputs and input gradients equal
    BatchNorm on the concatenated batch, and ``weight.grad``/``bias.grad`` are this rank's
    share, summing to the global gradient (DDP's all_reduce does the sum). One all_gather in
    forward, one all_reduce in backward; any backend (gloo on CPU, nccl, mpi).

    A rank may hold fewer samples than the others, or none: it still takes part in every
    collective and gets an empty output of the right shape. The running statistics use the
    global count (unbiased variance ``var * n / (n - 1)``, torch's momentum convention) and
    are bitwise identical on every rank. Eval mode uses them with no communication. Without
    an initialised process group, or with a group of one, it is plain BatchNorm (warning once
    per process when no group exists).

    Deliberately *not* a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel
    raises "SyncBatchNorm layers only work with GPU modules" for any CPU module containing
    an instance of it, which would defeat the point (gloo on CPU). It is a
    ``torch.nn.modules.batchnorm._BatchNorm`` (like torch's) with the same constructor,
    ``process_group`` attribute and ``state_dict``, so checkpoints move both ways and BN
    utilities (fold, freeze, distribute_bn) recognise it.

    The channel counts of all ranks are compared once, on a module's first synchronized
    forward (a one-number all_gather); later steps use a single collective.

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
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        torch_base = torch_bias_kwarg(bias, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **torch_base
        )
        self.process_group = process_group
        self._checked_groups: set[int] = set()

    def _sync_group(self, x: Tensor) -> tuple[Any, int]:
        """The group to reduce over and its size; ``(None, 1)`` when there is nothing to sync."""
        global _warned_no_group
        if not (dist.is_available() and dist.is_initialized()):
            if not _warned_no_group:
                warnings.warn(
                    "SyncBatchNorm: no torch.distributed process group is initialised, so it "
                    "normalizes with this process's statistics only (plain BatchNorm); call "
                    "torch.distributed.init_process_group first to synchronize",
                    UserWarning,
                    stacklevel=3,
                )
                _warned_no_group = True
            return None, 1
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        world_size = dist.get_world_size(group)
        if world_size <= 1:
            return None, 1
        if id(group) not in self._checked_groups:
            self._check_channels_across_ranks(x, group, world_size)
            self._checked_groups.add(id(group))
        return group, world_size

    def _fused_act(self) -> tuple[str, float, bool] | None:
        """``(act, negative_slope, save_memory)`` to fuse into the kernels, or None (plain BN)."""
        return None

    def _check_channels_across_ranks(self, x: Tensor, group: Any, world_size: int) -> None:
        mine = torch.tensor([self.num_features], dtype=torch.int64, device=x.device)
        theirs = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(theirs, mine, group=group)
        counts = [int(t.item()) for t in theirs]
        if len(set(counts)) > 1:
            raise ValueError(
                f"{type(self).__name__}: ranks disagree on the channel count: num_features per rank "
                f"= {counts} (this is rank {dist.get_rank(group)}); every rank must build the same "
                "model, and the SyncBatchNorm layers must run in the same order on every rank"
            )

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's parameter name
        if not isinstance(input, Tensor):
            raise TypeError(
                f"{type(self).__name__}: input must be a torch.Tensor, got {type(input).__name__}"
            )
        if not self._use_batch_stats():
            return super().forward(input)  # eval: BatchNorm on the running estimates, no communication
        self._check_input_dim(input)
        self._check_channels(input)
        running_mean, running_var = self._running_buffers()
        momentum = self._momentum_factor()
        # Every check that can fail runs before any collective or state change. The
        # one-value-per-channel check needs the global count: the zero-size view skips it
        # here and _sync_train makes it on the gathered count.
        functional.check_args(
            input.narrow(0, 0, 0),
            running_mean,
            running_var,
            self.weight,
            self.bias,
            True,
            momentum,
            self.eps,
            where=type(self).__name__,
        )
        group, world_size = self._sync_group(input)
        y, count = _sync_train(
            input, self.weight, self.bias, running_mean, running_var, self.eps, momentum, group, world_size,
            self._fused_act(),
        )  # fmt: skip
        if self._tracks_this_batch() and count > 0:
            self._count_batch()
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """Replace every BatchNorm layer of ``module`` with a SyncBatchNorm sharing its state.

        Converts ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and
        ``batchnorm.nn.BatchNorm1d/2d/3d``: parameters and buffers are the *same* tensors
        (no copy), mode and ``qconfig`` are kept. A fused BN + activation
        (``batchnorm.nn.BatchNormAct*d``, recognised by its ``act`` attribute) becomes a
        :class:`SyncBatchNormAct` that keeps the activation (fused) and ``save_memory``
        instead of silently dropping them as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
        does. Variants whose statistics are local by design (GhostBatchNorm, BatchRenorm,
        FrozenBatchNorm) are left as they are.
        Returns ``module`` converted in place, or the new layer if ``module`` itself is a BN.
        """
        converted = _convert_one(cls, module, process_group)
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


def _is_plain_bn(module: torch.nn.Module) -> bool:
    """BN layers with batch statistics to synchronize (not the Ghost/Renorm variants)."""
    from batchnorm.nn.ghost import _GhostBatchNorm
    from batchnorm.nn.renorm import _BatchRenorm

    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, (_GhostBatchNorm, _BatchRenorm)
    )


def _convert_one(cls: type, module: torch.nn.Module, process_group: Any) -> torch.nn.Module:
    if (
        not _is_plain_bn(module)
        or isinstance(module, SyncBatchNorm)
        and module.process_group is process_group
    ):
        return module
    kwargs = dict(
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        process_group=process_group,
        bias=getattr(module, "bias", None) is not None,
    )
    act = getattr(module, "act", None)
    if isinstance(act, (str, torch.nn.Module)):
        from batchnorm.nn.sync_act import SyncBatchNormAct

        # a BN + activation layer: keep its activation (torch's converter silently drops it)
        target = cls if issubclass(cls, SyncBatchNormAct) else SyncBatchNormAct
        new: torch.nn.Module = target(
            module.num_features,
            act=act,
            negative_slope=getattr(module, "negative_slope", 0.01),
            save_memory=isinstance(act, str) and bool(getattr(module, "save_memory", False)),
            **kwargs,
        )
    else:
        new = cls(module.num_features, **kwargs)
    with torch.no_grad():
        if module.affine:
            new.weight = module.weight
            new.bias = module.bias
    new.running_mean = module.running_mean
    new.running_var = module.running_var
    new.num_batches_tracked = module.num_batches_tracked
    new.train(module.training)
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new
