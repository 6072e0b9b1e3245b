"""PyTorch modules: drop-in batch norm and its variants, all on the project's kernels."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    "BatchNorm1d": "batchnorm.nn.batchnorm",
    "BatchNorm2d": "batchnorm.nn.batchnorm",
    "BatchNorm3d": "batchnorm.nn.batchnorm",
    "BatchNormAct1d": "batchnorm.nn.act",
    "BatchNormAct2d": "batchnorm.nn.act",
    "SyncBatchNorm": "batchnorm.nn.sync",
    "SyncBatchNormAct": "batchnorm.nn.sync_act",
    "GhostBatchNorm1d": "batchnorm.nn.ghost",
    "GhostBatchNorm2d": "batchnorm.nn.ghost",
    "BatchRenorm1d": "batchnorm.nn.renorm",
    "BatchRenorm2d": "batchnorm.nn.renorm",
    "FrozenBatchNorm1d": "batchnorm.nn.frozen",
    "FrozenBatchNorm2d": "batchnorm.nn.frozen",
    "FrozenBatchNorm3d": "batchnorm.nn.frozen",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'batchnorm.nn' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
