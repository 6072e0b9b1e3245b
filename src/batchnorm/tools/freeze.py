"""Freeze every batch norm of a model: statistics and affine parameters become fixed buffers.

``freeze(model)`` replaces each BN module (torch.nn's, ours, the variants) by
``batchnorm.nn.FrozenBatchNorm1d/2d/3d`` holding a copy of its eval-mode map::

    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

so the model gives the same BN output in train and eval mode, and fine-tuning leaves the BN
layers alone (detectron2's recipe for small per-device batches). It works **in place**, like
``convert`` which it calls: the model object is modified and returned; when ``model`` is itself
a BN module the frozen module is returned instead. The former BN weight and bias stop being
parameters, so build the optimizer after freezing. Undo with ``convert(model, "torch")``.
"""

from __future__ import annotations

from torch import nn

from batchnorm.tools.convert import convert

__all__ = ["freeze"]


def freeze(model: nn.Module) -> nn.Module:
    """Replace every BN module of ``model`` by its FrozenBatchNorm, in place; return the model.

    Raises ValueError for a BN with ``track_running_stats=False`` (no statistics to freeze).

    Shape:
        unchanged; each frozen layer takes what the BN took.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"freeze: model must be a torch.nn.Module, got {type(model).__name__}")
    return convert(model, "frozen")
