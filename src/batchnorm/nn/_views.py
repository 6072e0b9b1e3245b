"""NumPy views of a module's parameters and running buffers, made once and reused.

The modules' CPU fast path hands the kernels NumPy views of weight, bias and the running
buffers. ``Tensor.numpy()`` costs ~1.1 us a tensor, five of them a training call: a fifth of
a (64, 16) forward. A view stays exact while its tensor is the same object with the same
address, strides, shape and dtype: an in-place update (the
optimizer's step, ``load_state_dict``'s copy) changes neither and is seen through the view;
``.to()``, ``.data = ...``, a replaced buffer or parameter change one, and the views are
made again. That check costs ~0.3 us a tensor.

The views live beside the module, keyed weakly by it: a deleted module drops its entry, and
copies and pickles of a module never carry one.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

from torch import Tensor, nn

from batchnorm.kernels._dispatch import CheckedRunning, checked_running


class Views(NamedTuple):
    """NumPy views (None where the module has no such tensor) and the kernels' ``running``."""

    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    running: CheckedRunning | None  # (running_mean, running_var, num_batches_tracked, momentum)


_VIEWS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple, Views]] = weakref.WeakKeyDictionary()


def _place(t: Tensor | None) -> tuple | None:
    return None if t is None else (id(t), t.data_ptr(), t.stride(), t.shape, t.dtype)


def _view(t: Tensor | None) -> Any:
    return None if t is None else t.numpy(force=True)


def views(
    module: nn.Module,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    tracked: Tensor | None,
    momentum: float | None,
) -> Views:
    """The ``Views`` of these tensors of ``module``; ``running`` is built (with ``tracked``, the
    counter to bump or None, and ``momentum``) when momentum is given and both buffers exist.

    The caller has checked that weight, bias and the running buffers are CPU tensors of
    shape ``(C,)`` and one float dtype, and that ``tracked`` is a CPU 0-d integer tensor.
    """
    key = (
        _place(weight),
        _place(bias),
        _place(running_mean),
        _place(running_var),
        _place(tracked),
        momentum,
    )
    entry = _VIEWS.get(module)
    if entry is not None and entry[0] == key:
        return entry[1]
    rm, rv = _view(running_mean), _view(running_var)
    running = None
    if momentum is not None and rm is not None and rv is not None:
        running = checked_running((rm, rv, _view(tracked), momentum), rm.shape[0])
    made = Views(_view(weight), _view(bias), rm, rv, running)
    _VIEWS[module] = (key, made)
    return made
