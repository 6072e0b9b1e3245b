"""The one numba decorator every kernel uses, so the compilation choices live in one place.

* ``cache=True``: compiled code is written beside the source (``__pycache__``) so a new process
  loads it instead of recompiling.
* ``error_model="numpy"``: float division by zero gives inf/nan (IEEE) instead of raising, and
  the loops carry no per-division checks.
* fastmath, restricted to flags that only change rounding: ``reassoc`` lets LLVM split a sum into
  vector lanes (what makes the float64 accumulation vectorize), ``contract`` allows FMA, ``nsz``
  ignores the sign of zero. ``nnan``/``ninf`` are left out so NaN and inf propagate as in the
  reference. Reassociation cannot turn the two-pass variance into E[x^2] - E[x]^2: the mean is a
  separate loop whose result the second loop reads.
"""

from __future__ import annotations

import hashlib
import pathlib
import types

import numba

FASTMATH = {"reassoc", "contract", "nsz"}
# Element-wise kernels (no reduction to vectorize) go without ``reassoc``: it would let LLVM
# rewrite the compensated ``(x - mean_hi) - mean_lo`` as ``x - (mean_hi + mean_lo)`` and lose
# the low half of the mean (measured: a 1.6e-3 output error at mean 1e4, float32).
ELEMENTWISE = {"contract", "nsz"}
# numba's cache is keyed on the kernel file's source stamp, not on these options: after changing
# them here, touch stats.py/forward.py/backward.py (or clear their __pycache__).
_OPTIONS = {"cache": True, "error_model": "numpy", "nogil": True}


def drop_stale_caches(directory: pathlib.Path) -> bool:
    """Delete the numba caches in ``directory/__pycache__`` when any ``*.py`` there changed.

    numba keys a function's on-disk cache on its own file's stamp only, so after an edit of a
    helper in one file (``stats._stats_block``) a caller in another file
    (``forward.forward_rows``, which inlines it) would load its old machine code. One
    digest of every kernel source, kept beside the caches, catches that. True when caches
    were dropped. A read-only install keeps its caches elsewhere, keyed on files that only
    change by reinstalling: nothing to do there.
    """
    cache = directory / "__pycache__"
    stamp = cache / "kernel-sources.sha1"
    try:
        digest = hashlib.sha1(b"".join(p.read_bytes() for p in sorted(directory.glob("*.py")))).hexdigest()
        if stamp.is_file() and stamp.read_text() == digest:
            return False
        stale = sorted(cache.glob("*.nb[ic]"))
        for path in stale:
            path.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        return False
    return bool(stale)


drop_stale_caches(pathlib.Path(__file__).parent)


def serial_kernel(fn):  # type: ignore[no-untyped-def]
    """A single-threaded kernel (for inputs small enough that one thread does the work)."""
    return numba.njit(fastmath=FASTMATH, **_OPTIONS)(fn)


def elementwise_kernel(fn):  # type: ignore[no-untyped-def]
    """``parallel_kernel`` for loops without reductions: no reassociation (see ELEMENTWISE)."""
    return parallel_kernel(fn, ELEMENTWISE)


def parallel_kernel(fn, fastmath=FASTMATH):  # type: ignore[no-untyped-def]
    """A multi-threaded kernel (``prange`` on numba's pool) with a single-threaded twin ``.serial``.

    The dispatcher calls ``.serial`` when one thread does the work: entering the parallel region
    costs ~3-4 us per call even on one thread, a third of a (64, 16) forward. The twin is a copy
    of the function under another name because numba's on-disk cache is keyed by the function's
    qualified name and source, not by the ``parallel`` flag: one name for both would make each
    load the other's machine code.
    """
    twin = types.FunctionType(
        fn.__code__, fn.__globals__, fn.__name__ + "_serial", fn.__defaults__, fn.__closure__
    )
    twin.__qualname__ = fn.__qualname__ + "_serial"
    twin.__module__ = fn.__module__
    twin.__doc__ = fn.__doc__
    kernel = numba.njit(parallel=True, fastmath=fastmath, **_OPTIONS)(fn)
    kernel.serial = numba.njit(fastmath=fastmath, **_OPTIONS)(twin)
    return kernel
