"""Fused CPU kernels (numba) behind one dispatch module.

Every function takes NumPy arrays of shape ``(N, C, *spatial)`` with any strides and returns
new arrays (or writes into ``out``). See ``_dispatch`` for the contract.

Outputs of 256 KiB and more come from a cache of freed buffers (``_buffers``): a fresh
buffer's page faults cost as much as the kernel. ``empty_cache()`` returns the free ones to
the allocator, ``set_cache_limit(nbytes)`` bounds it (0: off), ``cached_bytes()`` says
what it holds.
"""

from batchnorm.kernels._buffers import cache_limit, cached_bytes, empty_cache, set_cache_limit
from batchnorm.kernels._dispatch import (
    backend_table,
    backward,
    backward_dx,
    backward_reduce,
    channel_stats,
    forward_train,
    normalize,
    normalize_running,
    num_threads,
    set_num_threads,
)

__all__ = [
    "backend_table",
    "backward",
    "backward_dx",
    "backward_reduce",
    "cache_limit",
    "cached_bytes",
    "channel_stats",
    "empty_cache",
    "forward_train",
    "normalize",
    "normalize_running",
    "num_threads",
    "set_cache_limit",
    "set_num_threads",
]
