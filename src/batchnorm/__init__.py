"""batchnorm: batch normalization, complete, correct and fast.

``import batchnorm`` needs only NumPy. The names below load their layer (numba, torch) on
first use, so ``batchnorm.reference`` and ``batchnorm.BatchNorm`` work without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> (module, attribute or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "reference": ("batchnorm.reference", None),
    "kernels": ("batchnorm.kernels", None),
    "functional": ("batchnorm.functional", None),
    "nn": ("batchnorm.nn", None),
    "BatchNorm": ("batchnorm.layer", "BatchNorm"),
    "fold": ("batchnorm.tools.fold", "fold"),
    "recalibrate": ("batchnorm.tools.recalibrate", "recalibrate"),
    "freeze": ("batchnorm.tools.freeze", "freeze"),
    "convert": ("batchnorm.tools.convert", "convert"),
    "diagnose": ("batchnorm.tools.diagnose", "diagnose"),
    "distribute_bn": ("batchnorm.tools.distribute", "distribute_bn"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'batchnorm' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
