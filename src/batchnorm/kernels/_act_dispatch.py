"""Dispatch for the fused BN + activation kernels (``kernels/act.py``): layouts, dtypes, checks.

Contract (the same conventions as ``kernels._dispatch``):

* ``x``, ``dy``: ``(N, C, *spatial)`` with any strides, float32 or float64 (float16 is computed
  in float32). Outputs have x's dtype and memory layout (channels-last stays channels-last).
* Statistics are ``(C,)`` in the compute dtype (float64 for float64 input, float32 otherwise),
  accumulated in float64.
* ``act`` is one of ``ACTIVATIONS``; ``slope`` is leaky_relu's negative slope.

Functions (the names of ``batchnorm.kernels.triton``'s act functions)::

    forward_train(x, gamma, beta, eps, act, slope)                 -> (y, mean, var, invstd)
    forward_inference(x, gamma, beta, mean, var, eps, act, slope)  -> y
    normalize_act(x, mean, invstd, gamma, beta, act, slope, out=None) -> y = act(gamma x_hat + beta)
    backward(dy, saved, mean, invstd, gamma, beta, act, slope, from_output) -> (dx, dgamma, dbeta)

and the two passes of ``backward`` on their own, for callers that reduce the sums across
processes in between (SyncBatchNormAct)::

    backward_reduce_act(dy, saved, mean, invstd, gamma, beta, act, slope, from_output)
        -> (sum_dz, sum_dz_xhat)              dz = dy * act'(z); the sums are dbeta, dgamma
    backward_dx_act(dy, saved, mean, invstd, gamma, beta, act, slope, from_output,
                    sum_dz, sum_dz_xhat, count, out=None)
        -> dx = gamma * invstd * (dz - sum_dz / count - x_hat * sum_dz_xhat / count)

``backward(..., from_output=True)`` takes the forward's output ``y`` as ``saved`` instead of
``x`` and recovers ``x_hat = (act^-1(y) - beta) / gamma``: only for invertible activations
(``INVERTIBLE``) and nonzero gamma.

Shape:
    x, y, dy, dx: ``(N, C, *spatial)``; gamma, beta, statistics: ``(C,)``.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from batchnorm.kernels._layout import CF, ROWS, _canonical_empty

ACTIVATIONS: dict[str, int] = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}
INVERTIBLE = ("identity", "leaky_relu")

# Rows per block in the (R, C) layout: a block is read twice for its statistics, and up to
# 1 MiB (the per-core L2 here) the second read mostly comes from cache. 1 MiB against 256 KiB
# (which left room for the output stream in a hot loop of the raw kernel), batchnorm bench,
# BatchNormAct1d x torch BN+ReLU, 4 interleaved pairs, medians, training forward / eval /
# forward+backward: (256, 1024) 0.82 -> 0.85x / 1.06 -> 1.10x / 0.81 -> 0.81x, (4096, 256)
# 1.08 -> 1.15x / 1.44 -> 1.52x / 0.94 -> 0.98x (the plain BN's rows blocks, see
# ``_dispatch._ROW_BLOCK_BYTES``, measured the same way).
_BLOCK_BYTES = 1 << 20
# Short maps (``_run``) take the rows kernels in the training forward from this many values on:
# two kernels and the per-channel combine in NumPy cost more than the one fused channels-first
# call below it. Module training forward, float32, 2 threads, interleaved, us, rows vs fused:
# (64, 256, 2, 2) 329 vs 264, (128, 64, 4, 4) 270 vs 209, (1024, 16, 3, 3) 310 vs 298,
# (512, 256, 2, 2) 741 vs 2483. The backward takes them at any size: (64, 256, 2, 2)
# forward+backward 717 vs 935 us.
_RUN_FORWARD_MIN = 1 << 18
# (N, C, S) backward: blocks of channels whose dy and x slabs fit in cache run the fused
# ``act.backward_cf`` (the plain BN's block choice, ``_dispatch._channel_blocks``); other
# inputs take the two-kernel path (sums, then dx) split over (n, c) rows.


_modules: dict[str, Any] = {}


def _kernels():  # type: ignore[no-untyped-def]
    # numba is imported with the first kernel call, so `import batchnorm.kernels` stays light;
    # kept in a dict afterwards (an import statement per call costs ~1 us).
    kernels = _modules.get("act")
    if kernels is None:
        from batchnorm.kernels import act as kernels

        _modules["act"] = kernels
    return kernels


def _dispatch():  # type: ignore[no-untyped-def]
    dispatch = _modules.get("dispatch")
    if dispatch is None:
        from batchnorm.kernels import _dispatch as dispatch

        _modules["dispatch"] = dispatch
    return dispatch


def _threads(size: int) -> int:
    """Threads for ``size`` elements: the BN kernels' policy (one thread below their
    ``_PARALLEL_MIN``, else torch's thread count), sharing its override."""
    return _dispatch()._use_threads(size)


def _k(kernel, threads: int):  # type: ignore[no-untyped-def]
    return kernel.serial if threads == 1 else kernel


def _act_code(act: str, slope: float) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(
            f"act: expected one of {sorted(ACTIVATIONS)}, got {act!r}; "
            "for other activations apply them after a plain BatchNorm"
        )
    if act == "leaky_relu" and not math.isfinite(slope):
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
    if x.dtype != dtype:
        x = x.astype(dtype)
    # (N, C) C-contiguous is the small-MLP case: skip the moveaxis/prod below (a few us each,
    # which is most of a (64, 16) call's budget).
    if x.ndim == 2 and x.flags.c_contiguous:
        return "rc", x
    n, c = x.shape[:2]
    size = math.prod(x.shape[2:])
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
    if a.dtype != dtype:
        a = a.astype(dtype)
    if a.ndim == 2:
        return np.ascontiguousarray(a)  # (N, C): already the rc layout, if not its strides
    n, c = a.shape[:2]
    if layout == "rc":
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)).reshape(-1, c)
    return np.ascontiguousarray(a).reshape(n, c, -1)


def _empty_like_layout(x: np.ndarray, layout: str, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(kernel view, array shaped like x) sharing memory, in the kernel layout's memory order."""
    full, view = _canonical_empty(x, ROWS if layout == "rc" else CF, dtype)
    return view, full


def _out_view(out: np.ndarray | None, x: np.ndarray, layout: str, dtype: np.dtype):
    """(kernel view, result) for an output: a fresh array, or ``out`` when the kernel can write
    into it directly (x's shape and compute dtype, and a view in the kernel layout exists)."""
    if out is None:
        return _empty_like_layout(x, layout, dtype)
    if not isinstance(out, np.ndarray) or out.shape != x.shape:
        raise ValueError(
            f"out: expected an array of x's shape {x.shape}, got "
            f"{getattr(out, 'shape', type(out).__name__)}; pass out=None to allocate one"
        )
    if out.dtype == dtype:
        if out.ndim == 2 or layout == "ncs":
            if out.flags.c_contiguous:
                n, c = x.shape[:2]
                return (out if layout == "rc" or out.ndim == 2 else out.reshape(n, c, -1)), out
        else:
            moved = np.moveaxis(out, 1, -1)
            if moved.flags.c_contiguous:
                return moved.reshape(-1, x.shape[1]), out
    # out has another dtype or layout: compute into a fresh array, then copy (cast) once
    view, full = _empty_like_layout(x, layout, dtype)
    return view, _Deferred(full, out)


class _Deferred:
    """Marks an output that must still be copied into the caller's ``out``."""

    __slots__ = ("full", "out")

    def __init__(self, full: np.ndarray, out: np.ndarray) -> None:
        self.full, self.out = full, out


def _finish(result, like_dtype: np.dtype) -> np.ndarray:
    if isinstance(result, _Deferred):
        np.copyto(result.out, result.full, casting="unsafe")
        return result.out
    return result if result.dtype == like_dtype else result.astype(like_dtype)


def _row_starts(rows: int, channels: int, itemsize: int, threads: int) -> np.ndarray:
    """Block boundaries of the (R, C) kernels: at most ``_BLOCK_BYTES`` per block, and at
    least one block per thread."""
    return _row_starts_cached(rows, channels, itemsize, threads, _BLOCK_BYTES)


# Cached: the same shapes come back every step, and building the array costs ~5 us, a sixth
# of a (64, 16) call's budget. The arrays are read-only.
@functools.lru_cache(maxsize=256)
def _row_starts_cached(rows: int, channels: int, itemsize: int, threads: int, block_bytes: int) -> np.ndarray:
    per_block = max(1, block_bytes // max(1, channels * itemsize))
    per_block = min(per_block, max(1, -(-rows // threads)))
    n_blocks = max(1, -(-rows // per_block))
    starts = np.minimum(np.arange(n_blocks + 1, dtype=np.int64) * per_block, rows)
    starts.flags.writeable = False
    return starts


def _vector(a, channels: int, default: float, name: str) -> np.ndarray:
    if a is None:
        return np.full(channels, default)
    v = a if isinstance(a, np.ndarray) and a.dtype == np.float64 else np.asarray(a, np.float64)
    # Checked even on the fast path: the kernels index it by channel without bounds checks.
    if v.shape != (channels,):
        raise ValueError(
            f"{name}: expected shape ({channels},) (one value per channel of x), got {np.shape(a)}; "
            "check that it belongs to this input's channel axis 1"
        )
    return v


def _affine(gamma, beta, channels: int) -> tuple[np.ndarray, np.ndarray]:
    return _vector(gamma, channels, 1.0, "gamma"), _vector(beta, channels, 0.0, "beta")


def _sum_parts(parts: np.ndarray) -> np.ndarray:
    # one block (every small input) needs no reduction call
    return parts[0].copy() if parts.shape[0] == 1 else parts.sum(axis=0)


def _stats(layout: str, v: np.ndarray, threads: int) -> tuple[np.ndarray, np.ndarray]:
    if layout == "ncs":  # the plain BN's (N, C, S) statistics
        return _dispatch()._stats64(v, CF, threads)
    k = _kernels()
    channels = v.shape[1]
    starts = _row_starts(v.shape[0], channels, v.itemsize, threads)
    part_mean = np.empty((starts.size - 1, channels))
    part_m2 = np.empty((starts.size - 1, channels))
    _k(k.block_stats_rc, threads)(v, starts, part_mean, part_m2)
    mean, var = np.empty(channels), np.empty(channels)
    k.combine_stats(part_mean, part_m2, np.diff(starts).astype(np.float64), mean, var)
    return mean, var


def _run(layout: str, v: np.ndarray) -> int:
    """S when the training kernels read an (N, C, S) view as N rows of C * S (short maps, as
    the plain BN's do: ``_dispatch._short_runs``), else 0. Each channel is then S columns of
    the rows kernels, its vectors repeated S times and its sums added afterwards."""
    dispatch = _dispatch()
    return v.shape[2] if layout == "ncs" and dispatch._short_runs(v, dispatch._SHORT_TRAIN_MIN_N) else 0


def _combine_runs(col_mean: np.ndarray, col_var: np.ndarray, run: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance from ``run`` columns per channel of equal counts:
    the mean of the means, and the mean of the variances plus the variance of the means."""
    means, variances = col_mean.reshape(-1, run), col_var.reshape(-1, run)
    with np.errstate(all="ignore"):  # non-finite columns propagate silently, as in torch
        mean = means.mean(axis=1)
        return mean, variances.mean(axis=1) + ((means - mean[:, None]) ** 2).mean(axis=1)


def _normalize_into(layout: str, v: np.ndarray, mean, scale, beta, code: int, slope: float, y_view) -> None:
    """y = act((x - mean) scale + beta) into ``y_view``; float64 (C,) vectors."""
    if not v.size:
        return
    k = _kernels()
    threads = _threads(v.size)
    if layout == "ncs" and _dispatch()._short_runs(v):
        # short maps as rows of C * S, as the plain BN's normalization, the vectors repeated S
        # times. BatchNormAct2d eval, interleaved, us, vs the fused kernel below:
        # (64, 256, 2, 2) 61 vs 94, (1024, 16, 3, 3) 78 vs 154, (512, 256, 2, 2) 155 vs 670
        # (normalize_act_ncs before), (64, 128, 4, 4) 77 vs 76
        mean, scale, beta = (np.repeat(a, v.shape[2]) for a in (mean, scale, beta))
        layout, v, y_view = "rc", _dispatch()._as_rows(v), _dispatch()._as_rows(y_view)
    if layout == "ncs" and (nb := _dispatch()._channel_blocks(*v.shape, v.itemsize, 1, threads)):
        # The training forward's compiled kernel with the statistics given (scale as its
        # gamma): an (N, C, S) BatchNormAct's first training step + eval call compiled in
        # 7.6-8.9 s instead of 11.3-13.1 s with normalize_act_ncs as well. Its float64 output
        # pass is 0-14% slower on eval than that kernel's float32 one ((16, 1024, 14, 14):
        # 0.65 -> 0.74 ms; (16, 2048, 7, 7): 0.31 -> 0.28 ms), still 1.2-13.5x torch BN + ReLU
        # in the bench suite.
        ones = np.ones(v.shape[1])
        _k(k.forward_act_cf, threads)(v, nb, False, scale, beta, 0.0, code, slope, y_view, mean, ones, ones)
    elif layout == "ncs":
        _k(k.normalize_act_ncs, threads)(v, mean, scale, beta, code, slope, threads, y_view)
    else:
        starts = _row_starts(v.shape[0], v.shape[1], v.itemsize, threads)
        _k(k.normalize_act_rc, threads)(v, mean, scale, beta, code, slope, starts, y_view)


def normalize_act(
    x: np.ndarray,
    mean,
    invstd,
    gamma,
    beta,
    act: str = "relu",
    slope: float = 0.01,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y = act(gamma * (x - mean) * invstd + beta)`` in one pass; into ``out`` if given.

    Shape:
        x, out, y: ``(N, C, *spatial)``; mean, invstd, gamma, beta: ``(C,)``.
    """
    code = _act_code(act, slope)
    dtype = _compute_dtype(x)
    layout, v = _canonical(x, dtype)
    g, b = _affine(gamma, beta, x.shape[1])
    scale = g * _vector(invstd, x.shape[1], 1.0, "invstd")
    mean64 = _vector(mean, x.shape[1], 0.0, "mean")
    y_view, y = _out_view(out, x, layout, dtype)
    _normalize_into(layout, v, mean64, scale, b, code, float(slope), y_view)
    return _finish(y, x.dtype)


def forward_train(x, gamma, beta, eps: float, act: str = "relu", slope: float = 0.01, stats64: bool = False):
    """Training forward: batch statistics (biased var), then ``y = act(gamma x_hat + beta)``.

    ``stats64=True`` returns the statistics in float64, unrounded, for the backward (see
    ``kernels.forward_train``).

    Shape:
        x, y: ``(N, C, *spatial)``; gamma, beta, mean, var, invstd: ``(C,)``.
    """
    code = _act_code(act, slope)
    dtype = _compute_dtype(x)
    layout, v = _canonical(x, dtype)
    if v.size == 0:
        raise ValueError(f"x: expected at least one value per channel, got shape {x.shape}")
    threads = _threads(v.size)
    g, b = _affine(gamma, beta, x.shape[1])
    # the layout and its view are reused: the public normalize_act would redo both
    y_view, y = _empty_like_layout(x, layout, dtype)
    channels = x.shape[1]
    if layout == "rc" and threads == 1 and v.nbytes <= _BLOCK_BYTES:
        mean, var, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
        _kernels().forward_train_act_rows(v, g, b, float(eps), code, float(slope), y_view, mean, var, invstd)
    elif v.size >= _RUN_FORWARD_MIN and (run := _run(layout, v)):
        # statistics per column of the rows, then per channel; _normalize_into reads the
        # same rows
        mean, var = _combine_runs(*_stats("rc", _dispatch()._as_rows(v), threads), run)
        invstd = 1.0 / np.sqrt(var + eps)
        _normalize_into(layout, v, mean, g * invstd, b, code, float(slope), y_view)
    elif layout == "ncs" and (
        nb := _dispatch()._channel_blocks(*v.shape, v.itemsize, 1, threads, train_forward=True)
    ):
        mean, var, invstd = np.empty(channels), np.empty(channels), np.empty(channels)
        _k(_kernels().forward_act_cf, threads)(
            v, nb, True, g, b, float(eps), code, float(slope), y_view, mean, var, invstd
        )
    else:
        mean, var = _stats(layout, v, threads)
        invstd = 1.0 / np.sqrt(var + eps)
        _normalize_into(layout, v, mean, g * invstd, b, code, float(slope), y_view)
    y = _finish(y, x.dtype)
    if dtype == np.float64 or stats64:
        return y, mean, var, invstd
    return y, mean.astype(dtype), var.astype(dtype), invstd.astype(dtype)


def forward_inference(
    x, gamma, beta, running_mean, running_var, eps: float, act: str = "relu", slope: float = 0.01
) -> np.ndarray:
    """Prediction forward: ``y = act(gamma (x - running_mean) / sqrt(running_var + eps) + beta)``."""
    dispatch = _dispatch()
    if (
        dispatch._serial_eval_rows(x)
        and dispatch._plain(running_mean, x)
        and dispatch._plain(running_var, x)
        and dispatch._plain(gamma, x)
        and dispatch._plain(beta, x)
    ):
        y = dispatch._buffers.empty(x.shape, x.dtype)  # large outputs from the cache
        code = _act_code(act, slope)
        _kernels().normalize_act_running_rows(
            x, running_mean, running_var, float(eps), gamma, beta, code, float(slope), y
        )
        return y
    invstd = 1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)
    return normalize_act(x, running_mean, invstd, gamma, beta, act, slope)


def _backward_args(dy, saved, mean, invstd, gamma, beta, act: str, slope: float, from_output: bool):
    """Checks and kernel-layout views shared by the two backward passes."""
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
    mu = _vector(mean, channels, 0.0, "mean")
    istd = _vector(invstd, channels, 1.0, "invstd")
    return dtype, layout, v, (d, v, mu, istd, g, b, code, float(slope), bool(from_output))


def _reduce(layout: str, args: tuple, threads: int) -> tuple[np.ndarray, np.ndarray]:
    k = _kernels()
    v = args[1]
    channels = v.shape[1]
    if layout == "ncs":
        parts = (np.empty((v.shape[0], channels)), np.empty((v.shape[0], channels)))
        _k(k.backward_reduce_ncs, threads)(*args, *parts)
    else:
        starts = _row_starts(v.shape[0], channels, v.itemsize, threads)
        parts = (np.empty((starts.size - 1, channels)), np.empty((starts.size - 1, channels)))
        _k(k.backward_reduce_rc, threads)(*args, starts, *parts)
    return _sum_parts(parts[0]), _sum_parts(parts[1])


def _dx(layout: str, args: tuple, sum_dz, sum_dz_xhat, count: int, threads: int, dx_view) -> None:
    k = _kernels()
    v = args[1]
    full = (*args, sum_dz / count, sum_dz_xhat / count)
    if layout == "ncs":
        _k(k.backward_dx_ncs, threads)(*full, dx_view)
    else:
        _k(k.backward_dx_rc, threads)(
            *full, _row_starts(v.shape[0], v.shape[1], v.itemsize, threads), dx_view
        )


def backward_reduce_act(
    dy, saved, mean, invstd, gamma, beta, act: str = "relu", slope: float = 0.01, from_output: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The backward's first pass: ``(sum dz, sum dz * x_hat)`` over this array, ``dz = dy act'(z)``.

    Local sums (``dbeta``, ``dgamma`` of this array), float64, to be reduced across processes
    before ``backward_dx_act``. ``saved`` is x, or y when ``from_output``.

    Shape:
        dy, saved: ``(N, C, *spatial)``; mean, invstd, gamma, beta and the sums: ``(C,)``.
    """
    _, layout, v, args = _backward_args(dy, saved, mean, invstd, gamma, beta, act, slope, from_output)
    if v.size == 0:
        return np.zeros(saved.shape[1]), np.zeros(saved.shape[1])
    return _reduce(layout, args, _threads(v.size))


def backward_dx_act(
    dy,
    saved,
    mean,
    invstd,
    gamma,
    beta,
    act: str,
    slope: float,
    from_output: bool,
    sum_dz,
    sum_dz_xhat,
    count: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """The backward's second pass: ``dx = gamma invstd (dz - sum_dz / count - x_hat sum_dz_xhat / count)``.

    ``count`` is the number of values per channel the sums were taken over (the global batch
    under SyncBatchNormAct). Writes into ``out`` if given.

    Shape:
        dy, saved, dx: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    if int(count) < 1:
        raise ValueError(f"count: expected the number of values per channel (>= 1), got {count}")
    dtype, layout, v, args = _backward_args(dy, saved, mean, invstd, gamma, beta, act, slope, from_output)
    channels = saved.shape[1]
    dx_view, dx = _out_view(out, saved, layout, dtype)
    if v.size:
        s_dz, s_dzx = (
            _vector(sum_dz, channels, 0.0, "sum_dz"),
            _vector(sum_dz_xhat, channels, 0.0, "sum_dz_xhat"),
        )
        _dx(layout, args, s_dz, s_dzx, int(count), _threads(v.size), dx_view)
    return _finish(dx, saved.dtype)


def backward(
    dy, saved, mean, invstd, gamma, beta, act: str = "relu", slope: float = 0.01, from_output: bool = False
):
    """``(dx, dgamma, dbeta)`` of ``y = act(gamma x_hat + beta)`` with batch statistics.

    ``saved`` is x, or the forward's output y when ``from_output`` (see the module docstring).

    Shape:
        dy, saved, dx: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    dtype, layout, v, args = _backward_args(dy, saved, mean, invstd, gamma, beta, act, slope, from_output)
    threads = _threads(v.size)
    dx_view, dx = _empty_like_layout(saved, layout, dtype)
    channels = v.shape[1]
    if layout == "rc" and v.size:
        dbeta, dgamma = np.empty(channels), np.empty(channels)
        starts = _row_starts(v.shape[0], channels, v.itemsize, threads)
        parts = np.empty((2, starts.size - 1, channels))
        _k(_kernels().backward_rc, threads)(*args, starts, parts[0], parts[1], dx_view, dbeta, dgamma)
    elif run := _run(layout, v):
        # the rows kernels per column, the sums per channel between the two passes
        d, _, mu, istd, g, b, *rest = args
        n = v.shape[0]
        as_rows = _dispatch()._as_rows
        rows_args = (as_rows(d), as_rows(v), *(np.repeat(a, run) for a in (mu, istd, g, b)), *rest)
        dbeta, dgamma = (part.reshape(-1, run).sum(axis=1) for part in _reduce("rc", rows_args, threads))
        sums = np.repeat(dbeta, run), np.repeat(dgamma, run)
        _dx("rc", rows_args, *sums, n * run, threads, as_rows(dx_view))
    elif layout == "ncs" and (nb := _dispatch()._channel_blocks(*v.shape, v.itemsize, 2, threads)):
        dbeta, dgamma = np.empty(channels), np.empty(channels)
        _k(_kernels().backward_cf, threads)(*args[:2], nb, *args[2:], dx_view, dbeta, dgamma)
    else:
        dbeta, dgamma = _reduce(layout, args, threads)
        _dx(layout, args, dbeta, dgamma, saved.size // max(1, saved.shape[1]), threads, dx_view)
    dx = _finish(dx, saved.dtype)
    if dtype == np.float64:
        return dx, dgamma, dbeta
    return dx, dgamma.astype(dtype), dbeta.astype(dtype)
