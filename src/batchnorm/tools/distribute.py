"""Make every rank's BatchNorm running statistics agree after data-parallel training.

With per-process BatchNorm under DDP each rank updates its running statistics from its own
slice of every batch, so after training the ranks hold different ``running_mean`` and
``running_var`` and evaluation (and every rank's checkpoint) depends on the rank.
``distribute_bn`` fixes that in one collective per dtype:

* ``reduce=True``: every rank gets the average over the ``W`` ranks::

      running_mean <- 1/W sum_r running_mean_r,   running_var <- 1/W sum_r running_var_r

  Each rank's ``running_var`` already estimates the population variance (its slices are
  samples of the same distribution), so the plain average is the better estimate; adding
  the spread of the rank means would count the sampling noise of the means twice.
* ``reduce=False``: every rank takes rank 0's statistics (a broadcast).

``num_batches_tracked`` is left alone (ranks step in lockstep). SyncBatchNorm's statistics are
already identical, so running it over them is harmless.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["bn_running_stats", "distribute_bn"]


def bn_running_stats(model: nn.Module) -> list[Tensor]:
    """The running-statistic buffers of every BN layer of ``model``, in module order."""
    buffers: list[Tensor] = []
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats:
            if module.running_mean is not None and module.running_var is not None:
                buffers += [module.running_mean, module.running_var]
    return buffers


def distribute_bn(model: nn.Module, reduce: bool = True, process_group: Any = None) -> nn.Module:
    """Average (``reduce=True``) or broadcast from rank 0 (``reduce=False``) the running
    statistics of every BatchNorm layer of ``model`` across ``process_group`` (default:
    the world), in place. Every rank must call it (it is collective). Returns ``model``.

    Without an initialised process group, or with a group of one, there is nothing to
    agree on and ``model`` is returned unchanged. Accepts a DDP-wrapped model.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"distribute_bn: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(reduce, bool):
        raise TypeError(
            f"distribute_bn: reduce must be True (average) or False (broadcast from rank 0), got {reduce!r}"
        )
    if not (dist.is_available() and dist.is_initialized()):
        return model
    group = process_group if process_group is not None else dist.group.WORLD
    world_size = dist.get_world_size(group)
    if world_size <= 1:
        return model
    buffers = bn_running_stats(model)
    # One flat buffer per (dtype, device): a single collective instead of two per layer.
    by_kind: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for b in buffers:
        by_kind.setdefault((b.dtype, b.device), []).append(b)
    for group_buffers in by_kind.values():
        flat = torch.cat([b.reshape(-1) for b in group_buffers])
        if reduce:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat /= world_size
        else:
            dist.broadcast(flat, src=dist.get_global_rank(group, 0), group=group)
        with torch.no_grad():
            offset = 0
            for b in group_buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
    return model
