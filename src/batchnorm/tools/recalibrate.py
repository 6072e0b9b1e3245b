"""Precise BN: recompute running statistics as population averages with every weight fixed.

During training the running statistics are exponential averages of batch statistics taken
while the weights were still moving, so they lag the final model; after fine-tuning on a new
domain they describe the old data. ``recalibrate`` (fvcore's ``update_bn_stats``, Wu & Johnson
2021, "Rethinking Batch in BatchNorm") passes ``K`` batches through the model and sets, for
every BN layer with running statistics::

    running_mean = 1/K * sum_k mean_k            (mean_k: the batch mean of batch k)
    running_var  = 1/K * sum_k var_k * m_k / (m_k - 1)
                                                 (the batch's unbiased variance, m_k values per channel)

Each batch weighs the same (fvcore: momentum 1 and a true running average over iterations). With
equal batch sizes the first line is exactly the mean over all the data; the second is the mean
of per-batch unbiased variances, an unbiased estimate of the population variance for i.i.d.
batches, and, like fvcore, it leaves out the spread of the batch means (the law of total variance),
which the network never sees at training time because each batch is centred on its own mean.

During the pass the model is in eval mode except its BN layers, which are in training mode so each
normalizes with its own batch statistics, as in training (dropout and other stochastic layers are
off). Statistics are read from each BN's input by a forward hook and accumulated in float64, so the
result does not depend on how a BN variant updates its buffers; meanwhile every BN's momentum is 0
and its buffers are restored afterwards. Training flags, momentum and ``num_batches_tracked`` come
back as they were; only ``running_mean`` and ``running_var`` change. Frozen BN and BN with
``track_running_stats=False`` are left alone, and so is a BN that no batch reaches.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from batchnorm.nn.frozen import _FrozenBatchNorm
from batchnorm.tools.convert import is_batchnorm

__all__ = ["batch_input", "batch_stats", "batch_stats_mode", "model_device", "recalibrate"]


def batch_input(batch: Any) -> torch.Tensor:
    """The model input of a batch: the batch itself, or the first item of a tuple/list."""
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(
            "recalibrate: each batch in data must be a tensor or a tuple/list whose first item is "
            f"the input tensor (as a DataLoader yields), got {type(batch).__name__}"
        )
    return batch


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel ``(mean, unbiased var, m)`` of a BN input, in float64.

    Shape:
        x: ``(N, C, *spatial)``; mean, var: ``(C,)``; ``m = N * prod(spatial)``.
    """
    flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
    m = flat.shape[1]
    mean = flat.mean(dim=1)
    # unbiased (m - 1): the convention of the running estimate, as torch stores it
    var = ((flat - mean[:, None]) ** 2).sum(dim=1) / max(m - 1, 1)
    return mean, var, m


def _recalibrated_layers(model: nn.Module) -> list[nn.Module]:
    return [
        m
        for m in model.modules()
        if is_batchnorm(m)
        and not isinstance(m, _FrozenBatchNorm)
        and getattr(m, "running_mean", None) is not None
    ]


@contextlib.contextmanager
def batch_stats_mode(
    model: nn.Module, layers: list[nn.Module], hook: Callable[[nn.Module, tuple[Any, ...]], None]
) -> Iterator[None]:
    """Run ``model`` in eval mode but ``layers`` (BN modules) in training mode, with ``hook``
    as a forward pre-hook on each of them, under ``torch.no_grad()``.

    Each BN normalizes with its batch statistics, as in training, while its momentum is 0 so
    its buffers stay put (BatchRenorm reads them); on exit the hooks go, and every training
    flag, momentum and buffer (``num_batches_tracked`` included) is restored.
    """
    flags = {m: m.training for m in model.modules()}
    momenta = {bn: bn.momentum for bn in layers if hasattr(bn, "momentum")}
    saved = {bn: {k: v.clone() for k, v in bn.named_buffers(recurse=False) if v is not None} for bn in layers}
    handles = [bn.register_forward_pre_hook(hook) for bn in layers]
    try:
        model.eval()
        for bn in layers:
            bn.train()
            if bn in momenta:
                bn.momentum = 0.0
        with torch.no_grad():
            yield
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
        with torch.no_grad():
            for bn, momentum in momenta.items():
                bn.momentum = momentum
            for bn, buffers in saved.items():
                for name, value in buffers.items():
                    getattr(bn, name).copy_(value)


def model_device(model: nn.Module) -> torch.device | None:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return None


def recalibrate(
    model: nn.Module,
    data: Iterable[Any],
    num_batches: int = 200,
    *,
    progress: bool | None = None,
) -> nn.Module:
    """Set every BN's running statistics to population averages over ``num_batches`` batches.

    In place; returns ``model``. ``data`` is any iterable of batches (a DataLoader, a list of
    tensors); a batch is a tensor or a tuple/list whose first item is the input. Fewer batches
    than ``num_batches`` are fine (all are used). ``progress`` shows a rich progress bar; None
    shows it when stderr is a terminal. See the module docstring for exactly what is computed.

    Shape:
        each batch's input: whatever ``model`` takes; BN inputs ``(N, C, *spatial)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"recalibrate: num_batches must be a positive int, got {num_batches!r}")
    layers = _recalibrated_layers(model)
    if not layers:
        return model

    sums: dict[nn.Module, list[Any]] = {bn: [0.0, 0.0, 0] for bn in layers}  # sum of means, of vars, batches

    def hook(bn: nn.Module, args: tuple[Any, ...]) -> None:
        mean, var, _ = batch_stats(args[0])
        acc = sums[bn]
        acc[0], acc[1], acc[2] = acc[0] + mean, acc[1] + var, acc[2] + 1

    device = model_device(model)
    with (
        batch_stats_mode(model, layers, hook),
        _progress_bar(progress, _length(data, num_batches)) as advance,
    ):
        for batch in itertools.islice(data, num_batches):
            x = batch_input(batch)
            model(x.to(device) if device is not None else x)
            advance()
    with torch.no_grad():
        for bn in layers:
            mean_sum, var_sum, count = sums[bn]
            if count:
                bn.running_mean.copy_(mean_sum / count)
                bn.running_var.copy_(var_sum / count)
    return model


def _length(data: Iterable[Any], num_batches: int) -> int | None:
    try:
        return min(len(data), num_batches)  # type: ignore[arg-type]
    except TypeError:
        return num_batches


class _progress_bar:
    """A rich progress bar, or nothing when disabled or stderr is not a terminal."""

    def __init__(self, enabled: bool | None, total: int | None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.total = total
        self._progress: Any = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return lambda: None
        from rich.console import Console
        from rich.progress import Progress

        self._progress = Progress(console=Console(stderr=True), transient=True)
        self._progress.__enter__()
        task = self._progress.add_task("recalibrating BN", total=self.total)
        return lambda: self._progress.advance(task)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
