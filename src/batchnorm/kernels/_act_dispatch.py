"""Dispatch for the fused BN + activation kernels (``kernels/act.py``): layouts, dtypes, checks.

Contract (the same conventions as ``kernels._dispatch``):

* ``x``, ``dy``: ``(N, C, *spatial)`` with any strides, float32 or float64 (float16 is computed
  in float32). Outputs have x's dtype and memory layout (channels-last stays channels-last).
* Statistics are ``(C,)`` in the compute dtype (float64 for float64 input, float32 otherwise),
  accumulated in float64.
* ``act`` is one of ``ACTIVATIONS``; ``slope`` is leaky_relu's negative slope.

Functions::

    forward_train(x, gamma, beta, eps, act, slope)                 -> (y, mean, var, invstd)
    forward_inference(x, gamma, beta, mean, var, eps, act, slope)  -> y
    normalize_act(x, mean, invstd, gamma, beta, act, slope)        -> y = act(gamma x_hat + beta)
    backward(dy, saved, mean, invstd, gamma, beta, act, slope, from_output) -> (dx, dgamma, dbeta)

``backward(..., from_output=True)`` takes the forward's output ``y`` as ``saved`` instead of
``x`` and recovers ``x_hat = (act^-1(y) - beta) / gamma``: only for invertible activations
(``INVERTIBLE``) and nonzero gamma.

Shape:
    x, y, dy, dx: ``(N, C, *spatial)``; gamma, beta, statistics: ``(C,)``.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS: dict[str, int] = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
INVERTIBLE = ("identity", "leaky_relu")

# Rows per block in the (R, C) layout: a block is read twice for its statistics, so it should
# stay in the per-core L2 (1 MiB here) next to the partial sums; 256 KiB leaves room for the
# output stream.
_BLOCK_BYTES = 256 * 1024


def _kernels():
    # numba is imported with the first kernel call, so `import batchnorm.kernels` stays light.
    from batchnorm.kernels import act as kernels

    return kernels


def _threads(size: int) -> int:
    """Threads for ``size`` elements: the BN kernels' policy (one thread below their
    ``_PARALLEL_MIN``, else torch's thread count), sharing its override."""
    from batchnorm.kernels import _dispatch

    return _dispatch._use_threads(size)


def _k(kernel, threads: int):  # type: ignore[no-untyped-def]
    return kernel.serial if threads == 1 else kernel


def _act_code(act: str, slope: float) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(
            f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}; "
            "for other activations apply them after a plain BatchNorm"
        )
    if act == "leaky_relu" and not np.isfinite(slope):
        raise ValueError(f"negative_slope: expected a finite number, got {slope}")
    return ACTIVATIONS[act]


def _compute_dtype(x: np.ndarray) -> np.dtype:
    if x.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(
            f"x: expected a float16, float32 or float64 array, got dtype {x.dtype}; "
            "convert it with x.astype(np.float32)"
        )
    return np.dtype(np.float64) if x.dtype == np.float64 else np.dtype(np.float32)


def _canonical(x: np.ndarray, dtype: np.dtype) -> tuple[str, np.ndarray]:
    """The kernel layout and a view of x in it: ``ncs`` (N, C, S) or ``rc`` (R, C)."""
    if x.ndim < 2:
        raise ValueError(f"x: expected shape (N, C, *spatial), got {x.ndim}-D shape {x.shape}")
    x = x.astype(dtype, copy=False)
    n, c = x.shape[:2]
    size = int(np.prod(x.shape[2:], dtype=np.int64))
    moved = np.moveaxis(x, 1, -1)
    # S == 1 is an (N, C) matrix: a per-(n, c) row of length 1 would waste the row kernels.
    if x.ndim == 2 or size == 1:
        return "rc", np.ascontiguousarray(moved).reshape(-1, c)
    if not x.flags.c_contiguous and moved.flags.c_contiguous:
        return "rc", moved.reshape(-1, c)
    if x.flags.c_contiguous:
        return "ncs", x.reshape(n, c, size)
    return "ncs", np.ascontiguousarray(x).reshape(n, c, size)


def _in_layout(a: np.ndarray, layout: str, dtype: np.dtype) -> np.ndarray:
    """``a`` (same shape as x) as a C-contiguous array in the given kernel layout."""
    a = a.astype(dtype, copy=False)
    n, c = a.shape[:2]
    if layout == "rc":
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)).reshape(-1, c)
    return np.ascontiguousarray(a).reshape(n, c, -1)


def _empty_like_layout(x: np.ndarray, layout: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(kernel view, array shaped like x) sharing memory, in x's layout."""
    n, c = x.shape[:2]
    if layout == "rc" and x.size != n * c:
        moved = np.empty((n, *x.shape[2:], c), dtype)
        return moved.reshape(-1, c), np.moveaxis(moved, -1, 1)
    full = np.empty(x.shape, dtype)
    # S == 1: (N, C, 1, 1) and its channels-last form are the same memory as (N, C).
    return full.reshape((n, c) if layout == "rc" else (n, c, -1)), full


def _row_starts(rows: int, channels: int, itemsize: int, threads: int) -> np.ndarray:
    per_block = max(1, _BLOCK_BYTES // max(1, channels * itemsize))
    per_block = min(per_block, max(1, -(-rows // threads)))  # at least one block per thread
    n_blocks = max(1, -(-rows // per_block))
    return np.minimum(np.arange(n_blocks + 1, dtype=np.int64) * per_block, rows)


def _affine(gamma, beta, channels: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.ones(channels) if gamma is None else np.asarray(gamma, np.float64).reshape(channels)
    b = np.zeros(channels) if beta is None else np.asarray(beta, np.float64).reshape(channels)
    return g, b


def _stats(layout: str, v: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    k = _kernels()
    channels = v.shape[1]
    if layout == "ncs":
        part_mean = np.empty((v.shape[0], channels))
        part_m2 = np.empty((v.shape[0], channels))
        _k(k.row_stats_ncs, threads)(v, part_mean, part_m2)
        counts = np.full(v.shape[0], float(v.shape[2]))
    else:
        starts = _row_starts(v.shape[0], channels, v.itemsize, threads)
        part_mean = np.empty((starts.size - 1, channels))
        part_m2 = np.empty((starts.size - 1, channels))
        _k(k.block_stats_rc, threads)(v, starts, part_mean, part_m2)
        counts = np.diff(starts).astype(np.float64)
    mean, var = np.empty(channels), np.empty(channels)
    k.combine_stats(part_mean, part_m2, counts, mean, var)
    return mean, var


def normalize_act(x, mean, invstd, gamma, beta, act: str = "relu", slope: float = 0.01) -> np.ndarray:
    """``y = act(gamma * (x - mean) * invstd + beta)`` in one pass."""
    code = _act_code(act, slope)
    dtype = _compute_dtype(x)
    layout, v = _canonical(x, dtype)
    g, b = _affine(gamma, beta, x.shape[1])
    scale = g * np.asarray(invstd, np.float64)
    shift = b - np.asarray(mean, np.float64) * scale
    y_view, y = _empty_like_layout(x, layout, dtype)
    if v.size:
        k = _kernels()
        threads = _threads(v.size)
        if layout == "ncs":
            _k(k.normalize_act_ncs, threads)(v, scale, shift, code, float(slope), y_view)
        else:
            starts = _row_starts(v.shape[0], v.shape[1], v.itemsize, threads)
            _k(k.normalize_act_rc, threads)(v, scale, shift, code, float(slope), starts, y_view)
    return y.astype(x.dtype, copy=False)


def forward_train(x, gamma, beta, eps: float, act: str = "relu", slope: float = 0.01):
    """Training forward: batch statistics (biased var), then ``y = act(gamma x_hat + beta)``."""
    _act_code(act, slope)
    dtype = _compute_dtype(x)
    layout, v = _canonical(x, dtype)
    if v.size == 0:
        raise ValueError(f"x: expected at least one value per channel, got shape {x.shape}")
    mean, var = _stats(layout, v, _threads(v.size))
    invstd = 1.0 / np.sqrt(var + eps)
    y = normalize_act(x, mean, invstd, gamma, beta, act, slope)
    return y, mean.astype(dtype), var.astype(dtype), invstd.astype(dtype)


def forward_inference(
    x, gamma, beta, running_mean, running_var, eps: float, act: str = "relu", slope: float = 0.01
) -> np.ndarray:
    """Prediction forward: ``y = act(gamma (x - running_mean) / sqrt(running_var + eps) + beta)``."""
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    return normalize_act(x, running_mean, invstd, gamma, beta, act, slope)


def backward(
    dy, saved, mean, invstd, gamma, beta, act: str = "relu", slope: float = 0.01, from_output: bool = False
):
    """``(dx, dgamma, dbeta)`` of ``y = act(gamma x_hat + beta)`` with batch statistics.

    ``saved`` is x, or the forward's output y when ``from_output`` (see the module docstring).
    """
    code = _act_code(act, slope)
    if from_output and act not in INVERTIBLE:
        raise ValueError(
            f"from_output: x_hat can be recovered from the output only for {INVERTIBLE}, got "
            f"act={act!r}; keep the input (save_memory=False) for this activation"
        )
    if from_output and act == "leaky_relu" and slope <= 0:
        raise ValueError(f"negative_slope: from_output needs a slope > 0 to invert, got {slope}")
    if dy.shape != saved.shape:
        raise ValueError(f"dy: expected the shape of the saved tensor {saved.shape}, got {dy.shape}")
    dtype = _compute_dtype(saved)
    layout, v = _canonical(saved, dtype)
    d = _in_layout(dy, layout, dtype)
    channels = saved.shape[1]
    g, b = _affine(gamma, beta, channels)
    if from_output and not np.all(g != 0):
        raise ValueError(
            "gamma: recovering x_hat from the output divides by gamma, which has zeros at "
            f"channels {np.flatnonzero(g == 0)[:8].tolist()}; use save_memory=False"
        )
    mu = np.asarray(mean, np.float64)
    istd = np.asarray(invstd, np.float64)
    k = _kernels()
    threads = _threads(v.size)
    count = saved.size // max(1, channels)
    if layout == "ncs":
        parts = (np.empty((v.shape[0], channels)), np.empty((v.shape[0], channels)))
        _k(k.backward_reduce_ncs, threads)(d, v, mu, istd, g, b, code, float(slope), from_output, *parts)
    else:
        starts = _row_starts(v.shape[0], channels, v.itemsize, threads)
        parts = (np.empty((starts.size - 1, channels)), np.empty((starts.size - 1, channels)))
        _k(k.backward_reduce_rc, threads)(
            d, v, mu, istd, g, b, code, float(slope), from_output, starts, *parts
        )
    dbeta, dgamma = parts[0].sum(axis=0), parts[1].sum(axis=0)
    dx_view, dx = _empty_like_layout(saved, layout, dtype)
    args = (d, v, mu, istd, g, b, code, float(slope), from_output, dbeta / count, dgamma / count)
    if layout == "ncs":
        _k(k.backward_dx_ncs, threads)(*args, dx_view)
    else:
        _k(k.backward_dx_rc, threads)(*args, starts, dx_view)
    return dx.astype(saved.dtype, copy=False), dgamma.astype(dtype), dbeta.astype(dtype)
