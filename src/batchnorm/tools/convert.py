"""Swap the batch-norm modules of a model from one kind to another.

``convert(model, to)`` replaces every BN module (torch.nn's, ours, the variants and the frozen
form) by the module of kind ``to``, in place, keeping for each one:

* the parameters and buffers themselves: the new module holds the *same* tensors (so an
  optimizer built before the swap keeps working) except for ``to="frozen"``, whose buffers are
  clones, and a frozen source, whose buffers are copied into fresh parameters;
* the device, dtype and training flag, ``eps``, ``momentum``, ``affine`` and
  ``track_running_stats`` (a frozen source converts as ``affine=True``, ``momentum=0.1``);
* sharing: a BN instance used at two places becomes one new instance used at both.

Kinds::

    "torch"      torch.nn.BatchNorm1d/2d/3d
    "batchnorm"  batchnorm.nn.BatchNorm1d/2d/3d   (drop-in, same state_dict)
    "frozen"     batchnorm.nn.FrozenBatchNorm1d/2d/3d
    "sync"       batchnorm.nn.SyncBatchNorm
    "ghost"      batchnorm.nn.GhostBatchNorm1d/2d  (needs virtual_batch_size=...)
    "renorm"     batchnorm.nn.BatchRenorm1d/2d

Extra keyword arguments go to the new module's constructor. SyncBatchNorm works for any input
rank, so converting *from* it to a 1d/2d/3d kind needs ``dim=1|2|3``.

This module also holds the small BN-recognition helpers the other tools share.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from batchnorm.nn.frozen import FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d, _FrozenBatchNorm

__all__ = ["KINDS", "batchnorm_modules", "bn_dim", "convert", "is_batchnorm"]

# kind -> (module holding the classes, {dim: class name}); dim None = any rank
_TARGETS: dict[str, tuple[str, dict[int | None, str]]] = {
    "torch": ("torch.nn", {1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}),
    "batchnorm": ("batchnorm.nn", {1: "BatchNorm1d", 2: "BatchNorm2d", 3: "BatchNorm3d"}),
    "frozen": ("batchnorm.nn", {1: "FrozenBatchNorm1d", 2: "FrozenBatchNorm2d", 3: "FrozenBatchNorm3d"}),
    "sync": ("batchnorm.nn", {None: "SyncBatchNorm"}),
    "ghost": ("batchnorm.nn", {1: "GhostBatchNorm1d", 2: "GhostBatchNorm2d"}),
    "renorm": ("batchnorm.nn", {1: "BatchRenorm1d", 2: "BatchRenorm2d"}),
}
KINDS: tuple[str, ...] = tuple(_TARGETS)

_DIM_CLASSES: tuple[tuple[int, tuple[type, ...]], ...] = (
    (1, (nn.BatchNorm1d, FrozenBatchNorm1d)),
    (2, (nn.BatchNorm2d, FrozenBatchNorm2d)),
    (3, (nn.BatchNorm3d, FrozenBatchNorm3d)),
)


def is_batchnorm(module: nn.Module) -> bool:
    """True for torch.nn's BN modules, ours and the variants (all ``_BatchNorm``), and frozen BN."""
    return isinstance(module, (_BatchNorm, _FrozenBatchNorm))


def batchnorm_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every BN module of ``model``, each instance once."""
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def bn_dim(module: nn.Module) -> int | None:
    """1, 2 or 3 for a BatchNorm{1,2,3}d-like module; None for rank-agnostic ones (SyncBatchNorm)."""
    for dim, classes in _DIM_CLASSES:
        if isinstance(module, classes):
            return dim
    # Variants that do not subclass torch's dimensioned classes follow its naming.
    name = type(module).__name__
    for dim in (1, 2, 3):
        if name.endswith(f"{dim}d"):
            return dim
    return None


def _target_class(to: str, dim: int | None, source: nn.Module, name: str) -> type[nn.Module]:
    module_name, classes = _TARGETS[to]
    key: int | None = None if None in classes else dim
    if key is None and None not in classes:
        raise ValueError(
            f"convert: cannot tell whether {name or 'the model'} ({type(source).__name__}) is 1d, 2d "
            f"or 3d, which to={to!r} needs; pass dim=1, 2 or 3 (BatchNorm1d/2d/3d)"
        )
    if key not in classes:
        raise ValueError(
            f"convert: to={to!r} has {', '.join(f'{d}d' for d in classes)} modules only, got "
            f"{name or 'the model'} ({type(source).__name__}), a {key}d layer; leave that layer out "
            "or choose another kind"
        )
    try:
        return getattr(importlib.import_module(module_name), classes[key])
    except (ImportError, AttributeError) as err:
        raise ValueError(
            f"convert: to={to!r} needs {module_name}.{classes[key]}, which is not available ({err})"
        ) from err


def activation_of(module: nn.Module) -> nn.Module | None:
    """The activation a BN module applies after normalizing (BatchNormAct's ``act``), as a
    module; None when there is none or it is the identity."""
    act = getattr(module, "act", None)
    if act is None or isinstance(act, nn.Identity):
        return None
    if isinstance(act, nn.Module):
        return act
    if act == "identity":
        return None
    if act == "relu":
        return nn.ReLU()
    if act == "leaky_relu":
        return nn.LeakyReLU(getattr(module, "negative_slope", 0.01))
    if act == "silu":
        return nn.SiLU()
    raise ValueError(
        f"{type(module).__name__} has act={act!r}, which batchnorm's tools do not know; "
        "expected identity, relu, leaky_relu or silu"
    )


def _convert_one(source: nn.Module, to: str, dim: int | None, kwargs: dict[str, Any], name: str) -> nn.Module:
    target = _target_class(to, bn_dim(source) if dim is None else dim, source, name)
    if type(source) is target and not kwargs:
        return source
    act = activation_of(source)
    if act is not None:  # no target kind carries an activation
        raise ValueError(
            f"convert: {name or 'the model'} is a {type(source).__name__} with a fused activation "
            f"({act}); a plain {target.__name__} would drop it. Convert the model before fusing "
            "activations, or replace that layer by hand"
        )
    if issubclass(target, _FrozenBatchNorm):
        return target.from_batchnorm(source)

    frozen_source = isinstance(source, _FrozenBatchNorm)
    reference = source.running_mean if source.running_mean is not None else source.weight
    options: dict[str, Any] = {
        "eps": source.eps,
        "momentum": 0.1 if frozen_source else source.momentum,
        "affine": True if frozen_source else source.affine,
        "track_running_stats": True if frozen_source else source.track_running_stats,
        "device": reference.device if reference is not None else None,
        "dtype": reference.dtype if reference is not None else None,
    }
    accepted = inspect.signature(target).parameters
    if "track_running_stats" not in accepted:
        if not options.pop("track_running_stats"):
            raise ValueError(
                f"convert: {name or 'the model'} has track_running_stats=False, which "
                f"{target.__name__} does not support (it always tracks running statistics)"
            )
    options.update(kwargs)
    try:
        new = target(source.num_features, **options)
    except TypeError as err:
        raise TypeError(
            f"convert: building {target.__name__} for {name or 'the model'} failed: {err}"
        ) from err

    with torch.no_grad():
        for key in ("weight", "bias"):
            value = getattr(source, key, None)
            if value is None or getattr(new, key, None) is None:
                continue
            if frozen_source:
                getattr(new, key).copy_(value)
            else:
                setattr(new, key, value)
        for key, value in source.named_buffers(recurse=False):
            if value is None or key not in new._buffers or new._buffers[key] is None:
                continue
            if new._buffers[key].shape == value.shape:
                new._buffers[key] = value
    new.train(source.training)
    return new


def convert(model: nn.Module, to: str, *, dim: int | None = None, **kwargs: Any) -> nn.Module:
    """Replace every BN module of ``model`` by one of kind ``to``, in place; return the model.

    ``to`` is one of ``"torch"``, ``"batchnorm"``, ``"frozen"``, ``"sync"``, ``"ghost"``,
    ``"renorm"`` (see the module docstring). When ``model`` is itself a BN module the new module
    is returned (use the return value). Outputs are unchanged in eval mode for every kind, and
    in train mode between ``"torch"``, ``"batchnorm"`` and ``"sync"`` (single process).

    Raises:
        ValueError: unknown ``to``; a layer the target kind has no class for (3d to ghost,
            SyncBatchNorm without ``dim``); ``to="ghost"`` without ``virtual_batch_size``.
    """
    if to not in _TARGETS:
        raise ValueError(f"convert: to must be one of {', '.join(map(repr, KINDS))}, got {to!r}")
    if to == "ghost" and "virtual_batch_size" not in kwargs:
        raise ValueError(
            "convert: to='ghost' needs virtual_batch_size=... (the number of samples per ghost "
            "batch, e.g. 32), got none"
        )
    if dim not in (None, 1, 2, 3):
        raise ValueError(f"convert: dim must be 1, 2, 3 or None, got {dim!r}")

    if is_batchnorm(model):
        return _convert_one(model, to, dim, kwargs, "")
    # Build every replacement before swapping any, so an error leaves the model untouched.
    slots = list(_bn_slots(model, ""))
    memo: dict[int, nn.Module] = {}
    for _, _, child, qualified in slots:
        if id(child) not in memo:
            memo[id(child)] = _convert_one(child, to, dim, kwargs, qualified)
    for parent, child_name, child, _ in slots:
        setattr(parent, child_name, memo[id(child)])
    return model


def _bn_slots(module: nn.Module, prefix: str) -> Iterator[tuple[nn.Module, str, nn.Module, str]]:
    """``(parent, attribute, bn, qualified name)`` for every place a BN module is registered."""
    # _modules rather than named_children(): the latter yields a shared child only once.
    for child_name, child in module._modules.items():
        if child is None:
            continue
        qualified = f"{prefix}{child_name}"
        if is_batchnorm(child):
            yield module, child_name, child, qualified
        else:
            yield from _bn_slots(child, qualified + ".")
