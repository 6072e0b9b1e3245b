"""Layouts: how any input array is seen, without copying where possible, by the kernels.

Two canonical layouts:

* channels-first ``(N, C, S)`` C-contiguous: contiguous ``(N, C, *spatial)`` arrays (and a
  Fortran-ordered ``(N, C)``, seen as ``(1, C, N)``).
* rows ``(R, C)`` C-contiguous: ``(N, C)`` arrays and channels-last 4-D/5-D arrays (the
  transposed view ``(N, *spatial, C)``).

Anything else (sliced, oddly permuted) is copied once, keeping its axis order where possible.
Also here: the argument checks and the output buffer shared by every function of ``_dispatch``.
"""

from __future__ import annotations

import math

import numpy as np

from batchnorm.kernels import _buffers

CF = "channels-first"
ROWS = "channels-last/rows"
_CF_T = "transposed (N, C)"


def _compute_dtype(x: np.ndarray) -> np.dtype:
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _perm(ndim: int) -> tuple[int, ...]:
    """(N, C, *spatial) -> (N, *spatial, C)."""
    return (0, *range(2, ndim), 1)


def _kind(a: np.ndarray) -> str | None:
    if a.flags.c_contiguous:
        return ROWS if math.prod(a.shape[2:]) == 1 else CF
    if a.ndim > 2 and a.transpose(_perm(a.ndim)).flags.c_contiguous:
        return ROWS
    if a.ndim == 2 and a.flags.f_contiguous:
        return _CF_T
    return None


def _view(a: np.ndarray, kind: str) -> np.ndarray:
    """The canonical 3-D (channels-first) or 2-D (rows) view of an array of layout ``kind``."""
    # The canonical arrays themselves, returned as they are: (64, 16) float32 forward_train
    # builds three views, each ~0.95 -> ~0.15 us.
    if kind == ROWS and a.ndim == 2:
        return a
    if kind == CF and a.ndim == 3:
        return a
    n, c = a.shape[:2]
    if kind == CF:
        return a.reshape(n, c, math.prod(a.shape[2:]))
    if kind == ROWS:
        return a.transpose(_perm(a.ndim)).reshape(a.size // c, c)
    return a.T.reshape(1, c, n)


def _in_layout(a: np.ndarray, kind: str) -> np.ndarray:
    """``a`` itself if it has layout ``kind``, else a copy that has it."""
    if _kind(a) == kind:
        return a
    if kind == CF:
        return np.ascontiguousarray(a)
    if kind == ROWS and a.ndim == 2:
        # (N, C) rows are plain C order; the general permutation (np.argsort of a tuple) cost
        # ~3 us for the expanded dy of every (N, C) backward after .sum()
        return np.ascontiguousarray(a)
    if kind == ROWS:
        perm = _perm(a.ndim)
        return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))
    return np.asfortranarray(a)


def _check_x(x: np.ndarray, name: str = "x") -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{name}: expected a NumPy array, got {type(x).__name__}; use np.asarray({name})")
    if x.dtype.char not in "efd":  # float16/32/64; comparing dtypes to 3 types cost ~1 us
        raise TypeError(
            f"{name}: expected float16, float32 or float64, got {x.dtype}; "
            f"convert with {name}.astype(np.float32)"
        )
    if x.ndim < 2:
        raise ValueError(
            f"{name}: expected shape (N, C) or (N, C, *spatial), got {x.ndim}-D shape {x.shape}; "
            f"add a batch axis with {name}[None]"
        )
    return x


def _prepare(x: np.ndarray, name: str = "x") -> tuple[np.ndarray, str]:
    """x in its compute dtype and a canonical layout (copied once if needed), and the layout."""
    _check_x(x, name)
    if x.dtype == np.float16:
        x = x.astype(np.float32, order="K")  # float16 is computed in float32 (keeps the layout)
    kind = _kind(x)
    if kind is None:
        x = x.copy(order="K")  # contiguous, keeping the axis order (channels-last stays so)
        kind = _kind(x)
        if kind is None:
            x = np.ascontiguousarray(x)
            kind = _kind(x)
    return x, str(kind)


def _vector(v: np.ndarray | None, channels: int, name: str, default: float) -> np.ndarray:
    if v is None:
        return np.full(channels, default)
    a = np.ascontiguousarray(v, dtype=np.float64)
    if a.shape != (channels,):
        raise ValueError(
            f"{name}: expected shape ({channels},) (one value per channel of x), got {np.shape(v)}; "
            "check that it belongs to this input's channel axis 1"
        )
    return a


def _canonical_empty(
    x: np.ndarray, kind: str, dtype: np.dtype | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A new array shaped like ``x`` (of x's dtype, or ``dtype``) whose memory is laid out for
    ``kind``, and its canonical view ``_view(array, kind)``: C-contiguous for channels-first,
    rows of (N, *spatial) for the rows kind (C-contiguous (N, C), or channels-last)."""
    dtype = x.dtype if dtype is None else dtype
    if x.ndim == 2:  # (N, C): its own rows view (the common small-MLP call, kept to ~0.4 us)
        array = _buffers.empty(x.shape, dtype)
        return array, array
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])  # shapes, not sizes: an empty batch divides nothing
    if kind == CF:
        array = _buffers.empty(x.shape, dtype)
        return array, array.reshape(n, c, spatial)
    if spatial == 1:  # (N, C, 1, ...): C-contiguous is already the rows layout
        array = _buffers.empty(x.shape, dtype)
        return array, array.reshape(n, c)
    rows = _buffers.empty((n * spatial, c), dtype)
    # channels-last: rows of (N, *spatial) in memory, seen in x's axis order
    return rows.reshape(n, *x.shape[2:], c).transpose(0, x.ndim - 1, *range(1, x.ndim - 1)), rows


class _Output:
    """Where a kernel writes: a canonical view of ``out`` when possible, else a temporary."""

    def __init__(self, x: np.ndarray, kind: str, dtype: np.dtype, out: np.ndarray | None):
        if out is not None:
            if (
                not isinstance(out, np.ndarray)
                or out.shape != x.shape
                or out.dtype != dtype
                or not out.flags.writeable
            ):
                raise ValueError(
                    f"out: expected a writeable array of shape {x.shape} and dtype {dtype}, got "
                    f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}; "
                    "pass out=None to allocate"
                )
        self.out = out
        if out is None and kind != _CF_T:
            # x is canonical (``_prepare``): allocate in its layout directly, without
            # empty_like's stride sort and the layout checks. Channels-last (16, 64, 56, 56)
            # float32, kernels.forward_train 690 -> 615 us, backward 1189 -> 1109 us (2 threads,
            # interleaved with the previous code, runs of 10 calls)
            self.array, self.view = _canonical_empty(x, kind)
            return
        direct = out is not None and out.dtype == x.dtype and _kind(out) == kind
        self.array = out if direct else _buffers.empty_like(x)  # keeps x's layout
        if _kind(self.array) != kind:
            self.array = _in_layout(self.array, kind)
        self.view = _view(self.array, kind)

    def result(self, dtype: np.dtype) -> np.ndarray:
        if self.out is not None:
            if self.array is not self.out:
                self.out[...] = self.array
            return self.out
        return self.array if self.array.dtype == dtype else self.array.astype(dtype, order="K")
