"""Fused CPU kernels (numba) behind one dispatch module.

Every function takes NumPy arrays of shape ``(N, C, *spatial)`` with any strides and returns
new arrays (or writes into ``out``). See ``_dispatch`` for the contract.
"""

from batchnorm.kernels._dispatch import (
    backend_table,
    backward,
    backward_dx,
    backward_reduce,
    channel_stats,
    forward_train,
    normalize,
    num_threads,
    set_num_threads,
)

__all__ = [
    "backend_table",
    "backward",
    "backward_dx",
    "backward_reduce",
    "channel_stats",
    "forward_train",
    "normalize",
    "num_threads",
    "set_num_threads",
]
