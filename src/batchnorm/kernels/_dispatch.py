"""Dispatch: the one place that checks layouts and dtypes and picks a kernel.

Contract (shared by the numba kernels here and the Triton kernels in ``kernels/triton``):

* ``x``, ``dy``: ``(N, C, *spatial)``, any strides; float32 or float64 (float16 is computed in
  float32). Outputs have x's dtype and x's memory layout (channels-last stays channels-last).
* Statistics (``mean``, ``var``, ``invstd``, sums) are ``(C,)`` in the *compute dtype*: float64
  for float64 input, float32 otherwise. Channels-first statistics accumulate in float64; the
  rows layout sums 32-row runs of ``x - shift`` in float32 (shift: a per-block estimate of the
  mean, so the runs are small numbers) and combines the runs in float64, with an exact
  two-pass fallback per channel when the shift was far off (kernels/stats.py).
* ``gamma``/``beta`` may be ``None`` (meaning 1 and 0). Functions that produce a tensor the size
  of x accept ``out=`` (x's shape and dtype, any layout).

Functions::

    forward_train(x, gamma, beta, eps)        -> (y, mean, var, invstd)   var is biased;
        running=(running_mean, running_var, num_batches_tracked, momentum) updates those too
    normalize(x, mean, invstd, gamma, beta)   -> y = (x - mean) * invstd * gamma + beta
    normalize_running(x, running_mean, running_var, eps, gamma, beta)  -> normalize with 1/sqrt(var + eps)
    channel_stats(x)                          -> (mean, var)              biased, over N*S values
    backward_reduce(dy, x, mean, invstd)      -> (sum_dy, sum_dy_xhat)
    backward_dx(dy, x, mean, invstd, gamma, sum_dy, sum_dy_xhat, count) -> dx
    backward(dy, x, mean, invstd, gamma)      -> (dx, dgamma, dbeta)

Every input is viewed as one of two canonical layouts (``_layout``): channels-first
``(N, C, S)``, where the fused kernels run over blocks of consecutive channels and the others
over the ``(n, c)`` rows of S values (split into pieces when long), both in memory order; and
rows ``(R, C)`` ((N, C) and channels-last), where kernels run over row blocks vectorized across
channels. This module picks the kernel and the work split by layout, size and thread count.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import numba
import numpy as np

from batchnorm.kernels import _buffers
from batchnorm.kernels._layout import (
    CF,
    ROWS,
    _canonical_empty,
    _check_x,
    _compute_dtype,
    _in_layout,
    _kind,
    _Output,
    _prepare,
    _vector,
    _view,
)

# ``from module import name``: the package attribute ``kernels.backward`` is the function below,
# not the kernel module of the same name.
from batchnorm.kernels.backward import (
    backward_cf,
    backward_dx_cf,
    backward_dx_rows,
    backward_reduce_cf,
    backward_reduce_rows,
    backward_rows,
    backward_two_pass_cf,
)
from batchnorm.kernels.forward import (
    forward_rows,
    forward_train_cf,
    forward_two_pass_cf,
    normalize_cf,
    normalize_rows,
    normalize_running_cf,
    normalize_running_rows,
    predict_rows,
)
from batchnorm.kernels.running import numpy_running_step, running_step, running_step_counted
from batchnorm.kernels.stats import stats_cf, stats_rows

# ``forward_train``'s ``running``: (running_mean, running_var, num_batches_tracked | None, momentum)
Running = tuple


class CheckedRunning(tuple):
    """A ``running`` tuple whose entries ``checked_running`` has validated for C channels.

    NumPy arrays keep their shape, dtype and writeability, so the modules build one per
    set of buffers and reuse it: ``forward_train`` then checks only x against it, not the
    four entries again (1.4 -> 0.2 us a call).
    """


def checked_running(running: object, channels: int) -> CheckedRunning:
    """``running`` as a ``CheckedRunning``, after ``_check_running``'s checks of its entries."""
    _check_running_entries(running, channels)
    return CheckedRunning(running)  # type: ignore[arg-type]


# A channel's slab (x, or x and dy in backward) up to this size is processed by one thread in
# one go, its later passes served from cache (1 MiB of L2 per core, 32 MiB of shared L3 here).
_SLAB_BYTES = 4 << 20
# Fused channels-first kernels work on blocks of consecutive channels of about this size;
# blocks over half of it need runs (a block's values at one n) of _MIN_RUN_BYTES or more.
_CHANNEL_BLOCK_BYTES = 1 << 20
_MIN_RUN_BYTES = 16 << 10
# A training forward's input of at most this size, with S < _SHORT_RUN, whose blocks would be
# short-run is fused anyway, as one block per thread (the longest runs; the second pass from L3).
_SHORT_RUN_SLAB_BYTES = 8 << 20
# Split reductions use blocks up to this size so their second pass hits L2.
_BLOCK_BYTES = 1 << 20
# Rows layout: blocks of rows up to this size (a block's partial sums are C float64 each).
# 1 MiB (one block per thread on inputs up to 2 MiB) against 256 KiB, tuned in a hot loop of
# the raw kernel: inside a module call between torch.nn layers the larger blocks are faster.
# batchnorm bench, 4 interleaved pairs, medians, training forward / forward+backward x torch:
# (256, 1024) 0.82 -> 0.88x / 0.82 -> 0.86x, (4096, 256) 1.16 -> 1.18x / 0.88 -> 0.91x,
# channels-last (16, 64, 56, 56) 0.91 -> 1.04x / 0.86 -> 0.89x, (64, 32, 28, 28) 1.32 -> 1.47x /
# 0.86 -> 0.88x; eval unchanged. 4 MiB measured as 1 MiB.
_ROW_BLOCK_BYTES = 1 << 20
# Below this many elements one thread does the work (the ``.serial`` twins): entering the
# parallel region costs ~3 us. stats_rows, 2 threads vs 1: (64, 16) 4.0 vs 1.0 us,
# (1024, 32) 8.6 vs 9.7 us, (4096, 64) 57 vs 66 us.
_PARALLEL_MIN = 1 << 15
# Rows layout: rows narrower than this many channels are regrouped into rows of up to
# _MAX_WIDE_ROW "virtual channels" (see ``_widen``).
_WIDE_ROW = 64
_MAX_WIDE_ROW = 256
# Channels-first inputs with S below this, N at least _SHORT_MIN_N and C * S up to
# _SHORT_MAX_ROW run as rows of C * S (``_short_runs``): normalization, training forward and
# backward.
_SHORT_RUN = 32
_SHORT_MIN_N = 16
_SHORT_MAX_ROW = 2048
# ... and training reads them as rows from this many samples on (see ``_short_runs``).
_SHORT_TRAIN_MIN_N = 64

_threads_override: int | None = None
# GNU OpenMP (numba's "omp" threading layer here; no TBB) is not fork-safe: a child forked after
# the pool started is killed by numba on its first parallel call ("Terminating: fork() called
# from a process already using GNU OpenMP"). Such a child runs the single-threaded twins instead.
_pool_started = False
_forked_after_pool = False


def _after_fork_in_child() -> None:
    global _forked_after_pool
    _forked_after_pool = _forked_after_pool or _pool_started


os.register_at_fork(after_in_child=_after_fork_in_child)


def num_threads() -> int:
    """Threads the kernels use: the override, else torch's count if torch is loaded, else numba's.

    Following ``torch.get_num_threads()`` keeps a torch program's thread setting in force for
    our kernels too; torch is looked up in ``sys.modules`` and never imported from here.
    """
    limit = numba.config.NUMBA_NUM_THREADS
    if _forked_after_pool:
        return 1
    if _threads_override is not None:
        return min(_threads_override, limit)
    torch = sys.modules.get("torch")
    get = getattr(torch, "get_num_threads", None)
    wanted = get() if get is not None else limit
    return max(1, min(int(wanted), limit))


def set_num_threads(n: int | None) -> None:
    """Fix the kernels' thread count to ``n`` (``None`` returns to following torch/numba)."""
    global _threads_override
    limit = numba.config.NUMBA_NUM_THREADS
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= limit):
        raise ValueError(
            f"set_num_threads: n must be an int in [1, {limit}] or None, got {n!r}; "
            f"numba's pool has {limit} threads (set NUMBA_NUM_THREADS before importing to change it)"
        )
    _threads_override = n


# The calling thread's numba thread count, read without numba.get_num_threads()'s two locks
# (it makes sure the pool is up first: 0.69 us vs 0.06 us a call here, once per kernel call).
# numba defines the raw getter when its pool starts; set on our first parallel call.
_numba_thread_count = None


def _use_threads(size: int) -> int:
    """Threads for an input of ``size`` elements; sets numba's (thread-local) count to match."""
    global _pool_started, _numba_thread_count
    if size < _PARALLEL_MIN or _forked_after_pool:
        return 1
    threads = num_threads()
    if threads > 1:
        if _numba_thread_count is None:
            numba.get_num_threads()  # starts the pool
            _numba_thread_count = getattr(numba.np.ufunc.parallel, "_get_num_threads", numba.get_num_threads)
        _pool_started = True
        if _numba_thread_count() != threads:
            numba.set_num_threads(threads)
    return threads


# Prediction on C-contiguous (N, C) rows of at least _WIDE_ROW channels (nothing to regroup)
# runs the one-call single-thread kernel below this many elements, not the parallel path: its
# layout set-up (~20 us of Python) and the parallel region cost more than a second thread saves
# there. BatchNorm1d eval module call, 2 threads, medians of 200 calls, three rounds: (256, 1024)
# 79-94 -> 53-74 us, (2048, 256) 146-161 -> 89-109 us, (512, 1024) 136-154 -> 83-117 us (torch
# 74-89, 96-124, 102-149); at (4096, 256) the parallel path wins (120-130 vs 145-175 us). The
# training paths measured mixed at these sizes and keep _PARALLEL_MIN.
_SERIAL_EVAL_MAX = 1 << 19


def _small_rows(x: object, limit: int = _PARALLEL_MIN) -> bool:
    """A non-empty C-contiguous float32/float64 ``(N, C)`` array below ``limit`` (_PARALLEL_MIN) elements.

    Such an input is its own canonical rows view, is not regrouped (``_widen``) and runs on one
    thread, so the functions below call the ``.serial`` kernel directly, skipping the layout
    machinery (_prepare, _Output, _view, _use_threads): the same kernel on the same arguments.
    (64, 16) float32, one call: forward_train 8.7 -> 5.2 us, backward 11.8 -> 6.6 us,
    normalize 8.2 -> 4.9 us.
    """
    return (
        type(x) is np.ndarray
        and x.ndim == 2
        and x.dtype.char in "fd"
        and 0 < x.size < limit
        and x.flags.c_contiguous
    )


def _serial_eval_rows(x: object) -> bool:
    """Prediction's one-call kernel applies: ``_small_rows``, or rows of at least _WIDE_ROW
    channels below _SERIAL_EVAL_MAX elements (see there)."""
    return _small_rows(x) or (_small_rows(x, _SERIAL_EVAL_MAX) and x.shape[1] >= _WIDE_ROW)  # type: ignore[attr-defined]


def _k(kernel, threads: int):  # type: ignore[no-untyped-def]
    """The kernel, or its single-threaded twin when one thread does the work (no pool start)."""
    return kernel.serial if threads == 1 else kernel


def _seg_cf(rows: int, s: int, itemsize: int, threads: int) -> int:
    """Pieces per (n, c) row of S values for the unfused channels-first kernels.

    Rows longer than _BLOCK_BYTES are split so a piece's second pass hits cache; few rows
    (N * C < 4 * threads) are split so every thread gets work.
    """
    by_cache = -(-s * itemsize // _BLOCK_BYTES)
    by_balance = -(-4 * threads // rows) if threads > 1 else 1
    return max(1, min(max(by_cache, by_balance), s))


def _channel_blocks(
    n: int, c: int, s: int, itemsize: int, arrays: int, threads: int, train_forward: bool = False
) -> int:
    """Blocks of consecutive channels for the fused kernels, or 0 where they do not apply.

    A block's slab (``arrays`` arrays of ``itemsize`` per value: x, or x and dy in backward)
    is about _CHANNEL_BLOCK_BYTES so its later passes come from L2; the block count is a
    multiple of the thread count. Not fused when one channel's slab exceeds _SLAB_BYTES, the
    blocks would leave threads idle, or a block is both large (over half of
    _CHANNEL_BLOCK_BYTES) and made of runs (its channels' values at one n, contiguous) shorter
    than _MIN_RUN_BYTES. (256, 16, 32, 32) float32 is one channel per block, 256 runs of 4 KB
    64 KB apart, 1 MB (a new page and prefetch stream per run, the later passes out of L2):
    interleaved A/B, 2 threads, kernels.forward_train 2.79 ms fused vs 1.67 ms unfused (row
    pieces in memory order), backward 3.02 vs 2.64 ms. Short runs in a small block are fine:
    (64, 128, 4, 4), 64 runs of 4 KB per block, 256 KB: 70 us fused vs 183 us unfused.

    Where that rule leaves a training forward's input (``train_forward``) with S < _SHORT_RUN
    of at most _SHORT_RUN_SLAB_BYTES unfused (rows of C * S too long for ``_short_runs``), it is
    fused as one block per thread instead: runs of C / threads channels, the second pass from
    L3. kernels.forward_train, float32, 2 threads, interleaved, this rule vs the unfused path,
    us, warm / after a 16 MB write: (128, 256, 4, 4) 153 vs 408 / 632 vs 866, (256, 512, 4, 4)
    991 vs 2132 / 2043 vs 3076; batchnorm bench, forward+backward x torch.nn, two runs each:
    1.07-1.30x vs 0.79-0.96x and 1.58-1.73x vs 1.18-1.33x. With S >= 32 the same rule made
    the forward faster on its own ((128, 64, 16, 16) 418 vs 502 us) but the bench's
    forward+backward slower in four runs of (512, 64, 8, 8) (1.43-1.51x vs 1.62-1.98x): not
    applied there. The backward ((64, 32, 16, 16), 4 MiB of x and dy: 156-276 vs 149-211 us
    warm) and BatchNormAct's single-pass prediction ((512, 64, 8, 8) 428-461 vs 287-290 us)
    measured slower that way too and keep their paths.
    """
    per_channel = n * s * itemsize * arrays
    if per_channel > _SLAB_BYTES:
        return 0
    nb = max(1, -(-c * per_channel // _CHANNEL_BLOCK_BYTES))
    nb = -(-nb // threads) * threads
    if not (nb < c and (c % nb == 0 or c // nb >= 4)):
        # one channel per block (e.g. (16, 64, 112, 112): 64 blocks of 800 KB), if that balances
        nb = c if c % threads == 0 or c >= 8 * threads else 0
    channels = -(-c // nb) if nb else 0  # per block, at most
    if nb and channels * s * itemsize < _MIN_RUN_BYTES and channels * per_channel > _CHANNEL_BLOCK_BYTES // 2:
        nb = 0
    if (
        not nb
        and train_forward
        and s < _SHORT_RUN
        and c % threads == 0
        and c * per_channel <= _SHORT_RUN_SLAB_BYTES
    ):
        return threads
    return nb


def _blocks_rows(r: int, c: int, itemsize: int, threads: int) -> int:
    nblk = -(-r * c * itemsize // _ROW_BLOCK_BYTES)
    nblk = -(-nblk // threads) * threads  # a multiple of the thread count: equal shares
    return max(1, min(nblk, r))


def _widen(rows: int, channels: int, size: int) -> int:
    """How many rows of a narrow (R, C) view to read as one row of C*k "virtual channels".

    With C < 64 the across-channel inner loop is too short to vectorize: channel statistics of a
    channels-last (64, 3, 64, 64) float32 input took 1.79 ms as (262144, 3) rows and take 0.21 ms
    read as (1024, 192), one thread. The (R/k, C*k) view is free (rows are contiguous) and the k
    partial results per channel combine exactly.
    """
    if channels >= _WIDE_ROW or size < _PARALLEL_MIN:
        return 1
    for k in range(_MAX_WIDE_ROW // channels, 1, -1):
        if rows % k == 0:
            return k
    return 1


def _short_runs(xv: np.ndarray, min_n: int = _SHORT_MIN_N) -> bool:
    """Whether the normalization of a channels-first ``(N, C, S)`` view runs as N rows of C * S.

    With short S, ``normalize_cf`` pays a loop setup per (n, c) row, and LLVM's vector loop
    (64 values per iteration) leaves S < 64 to the scalar remainder. Read as rows, the
    per-column constants repeat each channel's S times and the loop runs across the row.
    float32, 2 threads, kernels.normalize: (64, 128, 4, 4) 76 -> 49 us, (128, 64, 4, 4)
    75 -> 33 us; with rows of 4096 values ((64, 64, 8, 8)) it was slower (53 -> 83 us: the
    four per-column vectors no longer sit in L1). The training forward and backward read
    such inputs as rows too (``forward_rows``, ``backward_rows`` with run S): raw kernels,
    forward / backward vs the fused channels-first ones, (512, 256, 2, 2) 122 / 161 vs
    772 / 1059 us, (128, 64, 4, 4) 37 / 47 vs 68 / 87 us; at rows of 4096 or more values
    they lose there too ((128, 128, 8, 8) 562 / 1009 vs 248 / 467 us), and with few rows
    (``min_n``: _SHORT_TRAIN_MIN_N for training): module forward+backward, interleaved with
    the channels-first kernels, (32, 128, 4, 4) 239 vs 206-208 us, (48, 128, 4, 4) 283-367
    vs 257-350 us, (64, 128, 4, 4) 298-306 vs 307-311 us, (128, 128, 4, 4) 430-500 vs
    446-564 us.
    """
    n, c, s = xv.shape
    return s < _SHORT_RUN and n >= min_n and c * s <= _SHORT_MAX_ROW


def _as_rows(a: np.ndarray) -> np.ndarray:
    """A rows view as it is; a channels-first (N, C, S) view as N rows of C * S."""
    return a if a.ndim == 2 else a.reshape(a.shape[0], -1)


def _wide(a: np.ndarray, k: int) -> np.ndarray:
    return a if k == 1 else a.reshape(a.shape[0] // k, a.shape[1] * k)


def _tile(v: np.ndarray, k: int) -> np.ndarray:
    return v if k == 1 else np.tile(v, k)  # np.tile costs ~1.3 us even for k == 1


def _stats64(xv: np.ndarray, kind: str, threads: int) -> tuple[np.ndarray, np.ndarray]:
    c = xv.shape[1]
    if kind == ROWS:
        k = _widen(xv.shape[0], c, xv.size)
        xw = _wide(xv, k)
        mean, var = np.empty(c * k), np.empty(c * k)
        _k(stats_rows, threads)(xw, _blocks_rows(xw.shape[0], c * k, xv.itemsize, threads), mean, var)
        if k > 1:
            # k equal-count groups per channel: var = mean of group vars + var of group means.
            group_mean, group_var = mean.reshape(k, c), var.reshape(k, c)
            with np.errstate(all="ignore"):  # non-finite groups propagate silently, as in torch
                mean = group_mean.mean(axis=0)
                var = group_var.mean(axis=0) + ((group_mean - mean) ** 2).mean(axis=0)
        return mean, var
    mean, var = np.empty(c), np.empty(c)
    n, _, s = xv.shape
    seg = _seg_cf(n * c, s, xv.itemsize, threads)
    _k(stats_cf, threads)(xv.reshape(n * c, s), c, seg, threads, mean, var)
    return mean, var


def _normalize64(xv, kind, mean, scale, shift, yv, threads) -> None:  # type: ignore[no-untyped-def]
    """y = (x - mean) * scale + shift from float64 vectors, in x's dtype with a two-part mean."""
    if kind == ROWS:
        # forward_rows with the statistics given (scale as its gamma): the training
        # forward's compiled code, one kernel less to compile (see forward_rows)
        k = _widen(xv.shape[0], xv.shape[1], xv.size)
        xw = _wide(xv, k)
        nblk = _blocks_rows(xw.shape[0], xw.shape[1], xv.itemsize, threads)
        ones = np.ones(xv.shape[1])
        _k(forward_rows, threads)(xw, k, 1, nblk, False, scale, shift, 0.0, _wide(yv, k), mean, ones, ones)
    elif _short_runs(xv):
        n, c, s = xv.shape
        nblk = _blocks_rows(n, c * s, xv.itemsize, threads)
        _k(normalize_rows, threads)(xv.reshape(n, c * s), mean, scale, shift, s, nblk, yv.reshape(n, c * s))
    else:
        dt = xv.dtype
        hi, lo = _two_part(mean, dt)
        scale, shift = scale.astype(dt), shift.astype(dt)
        n, c, s = xv.shape
        seg = _seg_cf(n * c, s, xv.itemsize, threads)
        _k(normalize_cf, threads)(
            xv.reshape(n * c, s), c, hi, lo, scale, shift, seg, threads, yv.reshape(n * c, s)
        )


def _two_part(mean: np.ndarray, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """A float64 vector as ``hi + lo`` in dtype ``dt`` (``lo = 0`` for float64)."""
    hi = mean.astype(dt)
    with np.errstate(all="ignore"):  # inf - inf for a non-finite mean: NaN, silently as in torch
        return hi, (mean - hi).astype(dt)


def _reduce64(dyv, xv, kind, mean, invstd, threads) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    c = xv.shape[1]
    if kind == ROWS:
        k = _widen(xv.shape[0], c, xv.size)
        xw = _wide(xv, k)
        sum_dy, sum_dy_xhat = np.empty(c * k), np.empty(c * k)
        nblk = _blocks_rows(xw.shape[0], c * k, 2 * xv.itemsize, threads)
        hi, lo = _two_part(mean, xv.dtype)
        _k(backward_reduce_rows, threads)(
            _wide(dyv, k), xw, _tile(hi, k), _tile(lo, k), _tile(invstd, k), nblk, sum_dy, sum_dy_xhat
        )
        return sum_dy.reshape(k, c).sum(axis=0), sum_dy_xhat.reshape(k, c).sum(axis=0)
    sum_dy, sum_dy_xhat = np.empty(c), np.empty(c)
    n, _, s = xv.shape
    seg = _seg_cf(n * c, s, 2 * xv.itemsize, threads)
    _k(backward_reduce_cf, threads)(
        dyv.reshape(n * c, s), xv.reshape(n * c, s), c, mean, invstd, seg, threads, sum_dy, sum_dy_xhat
    )
    return sum_dy, sum_dy_xhat


def channel_stats(x: np.ndarray, stats64: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel batch mean and biased variance, over the N * prod(spatial) values of a channel.

    ``stats64=True``: in float64, unrounded (for a later backward, see ``forward_train``).

    Shape:
        x: ``(N, C, *spatial)``; mean, var: ``(C,)`` in the compute dtype.
    """
    xc, kind = _prepare(x)
    dt = np.dtype(np.float64) if stats64 else _compute_dtype(xc)
    if xc.size == 0:
        return np.full(x.shape[1], np.nan, dt), np.full(x.shape[1], np.nan, dt)
    mean, var = _stats64(_view(xc, kind), kind, _use_threads(xc.size))
    return mean.astype(dt, copy=False), var.astype(dt, copy=False)


def normalize(
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``y = (x - mean) * (invstd * gamma) + beta`` per channel (prediction mode, or after stats).

    Shape:
        x, y: ``(N, C, *spatial)``; mean, invstd, gamma, beta: ``(C,)``.
    """
    if out is None and _small_rows(x):
        c = x.shape[1]
        mean64 = _vector(mean, c, "mean", 0.0)
        scale = _vector(invstd, c, "invstd", 1.0) * _vector(gamma, c, "gamma", 1.0)
        shift = _vector(beta, c, "beta", 0.0)
        y = np.empty_like(x)
        normalize_rows.serial(x, mean64, scale, shift, 1, _blocks_rows(x.shape[0], c, x.itemsize, 1), y)
        return y
    xc, kind = _prepare(x)
    c = x.shape[1]
    mean64 = _vector(mean, c, "mean", 0.0)
    scale = _vector(invstd, c, "invstd", 1.0) * _vector(gamma, c, "gamma", 1.0)
    shift = _vector(beta, c, "beta", 0.0)
    y = _Output(xc, kind, x.dtype, out)
    if xc.size:
        _normalize64(_view(xc, kind), kind, mean64, scale, shift, y.view, _use_threads(xc.size))
    return y.result(x.dtype)


def _predict_canonical(
    x, plan: _Plan, threads: int, running_mean, running_var, eps: float, gamma, beta
) -> np.ndarray:  # type: ignore[no-untyped-def]
    """``normalize_running`` on a float32/float64 x already in a canonical layout
    (``plan.kind``: C-contiguous channels-first, or C-contiguous (N, C) / channels-last rows),
    with vectors of x's dtype, on ``threads``; the kernel and its split from ``plan.predict``.

    Rows and channels-first x form the float64 vectors inside one compiled call
    (``predict_rows``, ``normalize_running_cf``); channels-first x with short maps, read as
    rows of C * S, form them in NumPy for ``_normalize64``. In a loop the compiled vectors
    saved ~3 us a call, and the first channels-first call compiles ~0.35 s more; but right
    after another layer's work has gone through the caches the ten NumPy calls they replace
    cost 60-100 us. (This path without ``_prepare`` and ``normalize``'s checks, when it
    first came: float32, 2 threads, runs of 10 calls: (64, 3, 64, 64) 94 -> 80 us,
    (16, 1024, 14, 14) 550 -> 413 us, channels-last (16, 64, 56, 56) 432 -> 324 us,
    (4096, 256) 147 -> 121 us.)
    """
    xv = _view(x, plan.kind)
    name, shape, ints = plan.predict
    if name == "rows":
        k, nblk = ints
        y, yv = _canonical_empty(x, plan.kind)
        # run 1 and batch_stats False passed from here: forward_rows' training types (see there)
        _k(predict_rows, threads)(
            xv.reshape(shape),
            k,
            1,
            nblk,
            False,
            running_mean,
            running_var,
            float(eps),
            gamma,
            beta,
            yv.reshape(shape),
        )
        return y
    if name == "cf":
        y = _buffers.empty(x.shape, x.dtype)
        _k(normalize_running_cf, threads)(
            xv.reshape(shape),
            x.shape[1],
            running_mean,
            running_var,
            float(eps),
            gamma,
            beta,
            ints[0],
            threads,
            y.reshape(shape),
        )
        return y
    mean = running_mean.astype(np.float64)
    with np.errstate(all="ignore"):  # a negative running_var gives NaN silently, as in torch
        scale = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    if gamma is not None:
        scale *= gamma
    shift = np.zeros(x.shape[1]) if beta is None else beta.astype(np.float64)
    y, y_view = _canonical_empty(x, plan.kind)
    _normalize64(xv, plan.kind, mean, scale, shift, y_view, threads)
    return y


def normalize_running(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float,
    gamma: np.ndarray | None = None,
    beta: np.ndarray | None = None,
) -> np.ndarray:
    """Prediction: ``y = (x - running_mean) / sqrt(running_var + eps) * gamma + beta``.

    ``invstd`` is formed in float64. Shape: x, y: ``(N, C, *spatial)``; the vectors ``(C,)``.
    """
    if _plain(running_mean, x) and _plain(running_var, x) and _plain(gamma, x) and _plain(beta, x):
        if _serial_eval_rows(x):
            y = _buffers.empty(x.shape, x.dtype)  # large outputs from the cache
            normalize_running_rows(x, running_mean, running_var, float(eps), gamma, beta, y)
            return y
        if type(x) is np.ndarray and x.dtype.char in "fd" and x.ndim > 1 and x.size:
            threads = _use_threads(x.size)
            plan = _PLANS.get(_plan_key(x, threads))
            if plan is None and (kind := _kind(x)) in (CF, ROWS):
                plan = _plan(x, x, None, kind, _view(x, kind), threads)
            if plan is not None:
                return _predict_canonical(
                    x, plan, threads, running_mean, running_var, float(eps), gamma, beta
                )
    with np.errstate(all="ignore"):  # a negative running_var gives NaN silently, as in torch
        invstd = 1.0 / np.sqrt(_vector(running_var, x.shape[1], "running_var", 1.0) + eps)
    return normalize(x, running_mean, invstd, gamma, beta)


def _plain(v: object, x: np.ndarray) -> bool:
    """None, or a ``(C,)`` array of x's dtype (what the small-input kernels read as it is)."""
    return v is None or (type(v) is np.ndarray and v.dtype == x.dtype and v.shape == (x.shape[1],))


def forward_train(
    x: np.ndarray,
    gamma: np.ndarray | None,
    beta: np.ndarray | None,
    eps: float,
    out: np.ndarray | None = None,
    running: Running | None = None,
    stats64: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Training forward: batch statistics, then ``y = (x - mean) * invstd * gamma + beta``.

    Returns ``(y, mean, var, invstd)`` with ``var`` biased and ``invstd = 1 / sqrt(var + eps)``.
    ``running = (running_mean, running_var, num_batches_tracked, momentum)`` also updates those
    in place from the batch (``update_running``), once everything else has succeeded.

    ``stats64=True`` returns the statistics in float64, as computed, instead of the compute
    dtype: what a later ``backward`` should get. A float32 mean is rounded to ~6e-8 of its
    value, and at mean 1e4 and std 1e-2 that rounding is 5% of the std: every x_hat the
    backward forms from it is off by that much (module forward+backward on (16, 64, 7, 7):
    dweight off by 5.1e-2 of its largest value, dx by 3.2e-3, as in torch.nn; with the float64
    mean 3.8e-8 and 4.8e-8). The running update gets the rounded statistics either way, as
    it did before.

    Shape:
        x, y: ``(N, C, *spatial)``; gamma, beta, mean, var, invstd: ``(C,)``.
    """
    if running is not None:
        if type(running) is CheckedRunning and len(running[0]) == x.shape[1]:
            _check_running_count(x)
        else:
            _check_running(running, x)
    if out is None and _small_rows(x):
        # the direct .serial call, skipping the layout machinery (see _small_rows)
        c = x.shape[1]
        gamma64 = _vector(gamma, c, "gamma", 1.0)
        beta64 = _vector(beta, c, "beta", 0.0)
        y = np.empty_like(x)
        mean, var, invstd = np.empty(c), np.empty(c), np.empty(c)
        nblk = _blocks_rows(x.shape[0], c, x.itemsize, 1)
        forward_rows.serial(x, 1, 1, nblk, True, gamma64, beta64, float(eps), y, mean, var, invstd)
    else:
        y, mean, var, invstd = _forward_train(x, gamma, beta, eps, out)
    dt = _compute_dtype(x)
    if running is not None and x.size:
        stats = (mean, var)
        if running[0].dtype != dt != mean.dtype:
            # buffers of the compute dtype round the float64 statistics themselves
            # (running_step); others get them rounded to it first, as always
            stats = (mean.astype(dt), var.astype(dt))
        update_running(running, *stats, x.size // x.shape[1])
    if stats64 or invstd.dtype == dt:
        return y, mean, var, invstd
    return y, mean.astype(dt), var.astype(dt), invstd.astype(dt)


def _forward_train(
    x: np.ndarray, gamma: np.ndarray | None, beta: np.ndarray | None, eps: float, out: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``forward_train`` with the statistics in float64."""
    plan = output = None
    if out is None and type(x) is np.ndarray:
        threads = _use_threads(x.size)
        plan = _PLANS.get(_plan_key(x, threads))
    if plan is not None:  # a canonical x met before: its layout and kernel split are known
        xv = _view(x, plan.kind)
        y, yv = _canonical_empty(x, plan.kind)
    else:
        xc, kind = _prepare(x)
        output = _Output(xc, kind, x.dtype, out)
        if xc.size == 0:
            nan = np.full(x.shape[1], np.nan)
            return output.result(x.dtype), nan, nan.copy(), nan.copy()
        xv, yv = _view(xc, kind), output.view
        threads = _use_threads(xc.size)
        plan = _plan(x, xc, out, kind, xv, threads)
    c = x.shape[1]
    gamma64 = _vector(gamma, c, "gamma", 1.0)
    beta64 = _vector(beta, c, "beta", 0.0)
    mean, var, invstd = np.empty(c), np.empty(c), np.empty(c)
    name, shape, ints = plan.forward
    xk, yk = xv.reshape(shape), yv.reshape(shape)
    if name == "rows":
        k, run, nblk = ints
        _k(forward_rows, threads)(xk, k, run, nblk, True, gamma64, beta64, float(eps), yk, mean, var, invstd)
    elif name == "fused":
        _k(forward_train_cf, threads)(xk, ints[0], gamma64, beta64, float(eps), yk, mean, var, invstd)
    else:
        _k(forward_two_pass_cf, threads)(
            xk, c, gamma64, beta64, float(eps), ints[0], threads, yk, mean, var, invstd
        )
    if output is not None:
        y = output.result(x.dtype)
    return y, mean, var, invstd


class _Plan(NamedTuple):
    """How the kernels run on a canonical input: its layout ``kind``, and for the training
    forward, the backward and prediction ``(kernel, kernel view shape, integer arguments)``."""

    kind: str
    forward: tuple
    backward: tuple
    predict: tuple


# Plans of canonical float32/float64 inputs, by (shape, strides, dtype, threads, _settings()):
# a training step meets the same shapes every time, and deciding the layout and split again
# (about a dozen small Python calls) cost 10-30 us per module forward right after another
# layer's work had gone through the caches ((256, 1024), (4096, 256), (1024, 64), the two
# versions alternating in one process). Bounded: emptied when it reaches _PLANS_MAX entries.
_PLANS: dict[tuple, _Plan] = {}
_PLANS_MAX = 512


def _settings() -> tuple:
    """The thresholds the plans depend on (tests and tuning change them at run time)."""
    return (
        _SLAB_BYTES,
        _CHANNEL_BLOCK_BYTES,
        _MIN_RUN_BYTES,
        _SHORT_RUN_SLAB_BYTES,
        _BLOCK_BYTES,
        _ROW_BLOCK_BYTES,
        _PARALLEL_MIN,
        _WIDE_ROW,
        _MAX_WIDE_ROW,
        _SHORT_RUN,
        _SHORT_MIN_N,
        _SHORT_MAX_ROW,
        _SHORT_TRAIN_MIN_N,
    )


def _plan_key(x: np.ndarray, threads: int) -> tuple:
    return (x.shape, x.strides, x.dtype.char, threads, _settings())


def _plan(x: np.ndarray, xc: np.ndarray, out: object, kind: str, xv: np.ndarray, threads: int) -> _Plan:
    """The ``_Plan`` of ``xv``, the canonical view of layout ``kind`` of ``xc`` (x, or its
    canonical copy), on ``threads``; kept when x itself is canonical and there is no ``out``."""
    c, itemsize = xv.shape[1], xv.itemsize
    if kind == ROWS or _short_runs(xv, _SHORT_TRAIN_MIN_N):
        # one call for every rows input; short channels-first maps read as N rows of C * S
        run = 1 if kind == ROWS else xv.shape[2]
        rows, width = xv.shape[0], xv.size // xv.shape[0]
        k = _widen(rows, width, xv.size)
        shape = (rows // k, width * k)
        nblk = _blocks_rows(shape[0], shape[1], itemsize, threads)
        forward = ("rows", shape, (k, run, nblk))
        backward = ("rows", shape, (k, run, _blocks_rows(shape[0], shape[1], 2 * itemsize, threads)))
    else:
        n, s = xv.shape[0], xv.shape[2]
        flat = (n * c, s)
        seg = _seg_cf(n * c, s, itemsize, threads)
        if nb := _channel_blocks(n, c, s, itemsize, 1, threads, train_forward=True):
            forward = ("fused", xv.shape, (nb,))
        else:
            forward = ("two_pass", flat, (seg,))
        if nb := _channel_blocks(n, c, s, itemsize, 2, threads):
            backward = ("fused", xv.shape, (nb,))
        else:
            backward = ("two_pass", flat, (_seg_cf(n * c, s, 2 * itemsize, threads),))
    if kind == ROWS:
        predict = ("rows", shape, (k, nblk))  # the training forward's split, run 1
    elif _short_runs(xv):  # prediction reads short maps as rows from fewer samples on
        predict = ("short", xv.shape, ())
    else:
        predict = ("cf", flat, (seg,))
    plan = _Plan(kind, forward, backward, predict)
    if xc is x and out is None:
        if len(_PLANS) >= _PLANS_MAX:
            _PLANS.clear()
        _PLANS[_plan_key(x, threads)] = plan
    return plan


def _prepare_pair(dy: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, str]:
    xc, kind = _prepare(x)
    _check_x(dy, "dy")
    if dy.shape != x.shape:
        raise ValueError(f"dy: expected x's shape {x.shape}, got {dy.shape}; pass the gradient of y")
    dyc = dy.astype(xc.dtype, order="K", copy=False)
    return xc, _in_layout(dyc, kind), kind


def backward_reduce(
    dy: np.ndarray, x: np.ndarray, mean: np.ndarray, invstd: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``sum_dy = sum dy`` and ``sum_dy_xhat = sum dy * (x - mean) * invstd`` per channel.

    These are ``dbeta`` and ``dgamma``. Shape: dy, x: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    xc, dyc, kind = _prepare_pair(dy, x)
    c = x.shape[1]
    dt = _compute_dtype(xc)
    mean64 = _vector(mean, c, "mean", 0.0)
    invstd64 = _vector(invstd, c, "invstd", 1.0)
    sum_dy, sum_dy_xhat = np.zeros(c), np.zeros(c)
    if xc.size:
        threads = _use_threads(xc.size)
        sum_dy, sum_dy_xhat = _reduce64(_view(dyc, kind), _view(xc, kind), kind, mean64, invstd64, threads)
    return sum_dy.astype(dt), sum_dy_xhat.astype(dt)


def backward_dx(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    sum_dy: np.ndarray,
    sum_dy_xhat: np.ndarray,
    count: int,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """``dx = gamma * invstd * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)``.

    ``count`` is the number of values per channel the sums ran over (N * prod(spatial), or the
    global count when the sums were all-reduced across processes).

    Shape: dy, x, dx: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    xc, dyc, kind = _prepare_pair(dy, x)
    c = x.shape[1]
    mean64 = _vector(mean, c, "mean", 0.0)
    invstd64 = _vector(invstd, c, "invstd", 1.0)
    gamma64 = _vector(gamma, c, "gamma", 1.0)
    sum_dy64 = _vector(sum_dy, c, "sum_dy", 0.0)
    sum_dy_xhat64 = _vector(sum_dy_xhat, c, "sum_dy_xhat", 0.0)
    a, mdy, k = _dx_coefficients(gamma64, invstd64, sum_dy64, sum_dy_xhat64, count)
    dx = _Output(xc, kind, x.dtype, out)
    if xc.size:
        _dx64(_view(dyc, kind), _view(xc, kind), kind, mean64, a, mdy, k, dx.view, _use_threads(xc.size))
    return dx.result(x.dtype)


def _dx_coefficients(gamma, invstd, sum_dy, sum_dy_xhat, count: int):  # type: ignore[no-untyped-def]
    """``dx = a (dy - mdy - (x - mean) k)``'s per-channel ``(a, mdy, k)`` from float64 vectors:
    ``a = gamma invstd``, ``mdy = mean(dy)``, ``k = mean(dy x_hat) invstd``."""
    with np.errstate(all="ignore"):  # non-finite sums propagate silently, as in torch
        return gamma * invstd, sum_dy / count, sum_dy_xhat / count * invstd


def _dx64(dyv, xv, kind, mean, a, mdy, k, dxv, threads) -> None:  # type: ignore[no-untyped-def]
    if kind == ROWS:
        w = _widen(xv.shape[0], xv.shape[1], xv.size)
        xw = _wide(xv, w)
        nblk = _blocks_rows(xw.shape[0], xw.shape[1], 2 * xv.itemsize, threads)
        dt = xv.dtype
        vectors = [_tile(v, w) for v in (*_two_part(mean, dt), a.astype(dt), mdy.astype(dt), k.astype(dt))]
        _k(backward_dx_rows, threads)(_wide(dyv, w), xw, *vectors, nblk, _wide(dxv, w))
    else:
        n, c, s = xv.shape
        seg = _seg_cf(n * c, s, 2 * xv.itemsize, threads)
        r = n * c
        _k(backward_dx_cf, threads)(
            dyv.reshape(r, s), xv.reshape(r, s), c, mean, a, mdy, k, seg, threads, dxv.reshape(r, s)
        )


def backward(
    dy: np.ndarray,
    x: np.ndarray,
    mean: np.ndarray,
    invstd: np.ndarray,
    gamma: np.ndarray | None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training backward: ``(dx, dgamma, dbeta)``, the reduction then the dx pass.

    Shape: dy, x, dx: ``(N, C, *spatial)``; mean, invstd, gamma, dgamma, dbeta: ``(C,)``.
    """
    if (
        out is None
        and _small_rows(x)
        and type(dy) is np.ndarray
        and dy.dtype == x.dtype
        and dy.shape == x.shape
    ):
        c = x.shape[1]
        dyc = np.ascontiguousarray(dy)  # what _prepare_pair makes of it (an expanded dy: a copy)
        mean64 = _vector(mean, c, "mean", 0.0)
        invstd64 = _vector(invstd, c, "invstd", 1.0)
        gamma64 = _vector(gamma, c, "gamma", 1.0)
        dxa = np.empty_like(x)
        sum_dy, sum_dy_xhat = np.zeros(c), np.zeros(c)
        nblk = _blocks_rows(x.shape[0], c, 2 * x.itemsize, 1)
        backward_rows.serial(dyc, x, 1, 1, nblk, mean64, invstd64, gamma64, dxa, sum_dy, sum_dy_xhat)
        return dxa, sum_dy_xhat.astype(x.dtype), sum_dy.astype(x.dtype)
    plan = output = None
    if out is None and type(x) is np.ndarray:
        threads = _use_threads(x.size)
        plan = _PLANS.get(_plan_key(x, threads))
    if (
        plan is not None
        and type(dy) is np.ndarray
        and dy.shape == x.shape
        and dy.strides == x.strides
        and dy.dtype == x.dtype
    ):
        # dy in x's canonical layout (shape, strides and dtype as x's): no copy to make
        xv, dyv = _view(x, plan.kind), _view(dy, plan.kind)
        dx, dxv = _canonical_empty(x, plan.kind)
    else:
        xc, dyc, kind = _prepare_pair(dy, x)
        output = _Output(xc, kind, x.dtype, out)
        if xc.size == 0:
            zeros = np.zeros(x.shape[1], _compute_dtype(xc))
            return output.result(x.dtype), zeros, zeros.copy()
        xv, dyv, dxv = _view(xc, kind), _view(dyc, kind), output.view
        threads = _use_threads(xc.size)
        plan = _plan(x, xc, out, kind, xv, threads)
    c = x.shape[1]
    mean64 = _vector(mean, c, "mean", 0.0)
    invstd64 = _vector(invstd, c, "invstd", 1.0)
    gamma64 = _vector(gamma, c, "gamma", 1.0)
    sum_dy, sum_dy_xhat = np.empty(c), np.empty(c)  # the kernels set every channel's sums
    name, shape, ints = plan.backward
    xk, dyk, dxk = xv.reshape(shape), dyv.reshape(shape), dxv.reshape(shape)
    if name == "rows":
        k, run, nblk = ints
        _k(backward_rows, threads)(dyk, xk, k, run, nblk, mean64, invstd64, gamma64, dxk, sum_dy, sum_dy_xhat)
    elif name == "fused":
        _k(backward_cf, threads)(dyk, xk, ints[0], mean64, invstd64, gamma64, dxk, sum_dy, sum_dy_xhat)
    else:
        _k(backward_two_pass_cf, threads)(
            dyk, xk, c, mean64, invstd64, gamma64, ints[0], threads, dxk, sum_dy, sum_dy_xhat
        )
    if output is not None:
        dx = output.result(x.dtype)
    dt = _compute_dtype(x)
    return dx, sum_dy_xhat.astype(dt), sum_dy.astype(dt)


def backend_table() -> list[dict[str, str]]:
    """One row per (input dtype, layout): the kernel that runs, for ``batchnorm info``."""
    threads = f"{num_threads()} threads (1 below {_PARALLEL_MIN} elements)"
    layouts = {
        "(N, C, *spatial) contiguous": (
            f"numba, channel blocks fused, in memory order (row pieces if C is small; "
            f"S < {_SHORT_RUN} as rows of C*S); {threads}",
            "float64 accumulation",
        ),
        "(N, C), channels-last": (
            f"numba, row blocks across C (regrouped if C < {_WIDE_ROW}); {threads}",
            "float32 runs of 32 rows about a shift, combined in float64",
        ),
    }
    precision = {"float32": "{}", "float64": "float64", "float16": "float32 copy, {}, cast back"}
    rows = [
        {"input": dtype, "layout": layout, "kernel": f"{kernel}; {how.format(accumulation)}"}
        for dtype, how in precision.items()
        for layout, (kernel, accumulation) in layouts.items()
    ]
    rows.append({"input": "any", "layout": "other strides", "kernel": "copied once to one of the above"})
    return rows


def update_running_(
    running_mean: np.ndarray,
    running_var: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    count: int,
    momentum: float,
) -> None:
    """``running <- (1 - momentum) * running + momentum * batch`` in place, ``var`` unbiased.

    ``running_var`` gets ``var * count / (count - 1)`` (Bessel's correction on the biased batch
    variance). All four arrays are ``(C,)`` of one dtype (float32 or float64); the caller
    checks that. One compiled call instead of six NumPy operations on (C,) vectors: the
    (64, 16) module training forward 33.6 -> ~30 us.
    """
    update_running((running_mean, running_var, None, momentum), mean, var, count)


def update_running(running: Running, mean: np.ndarray, var: np.ndarray, count: int) -> None:
    """``update_running_`` on ``running = (running_mean, running_var, num_batches_tracked,
    momentum)``, and ``num_batches_tracked += 1`` (a 0-d integer array) when it is not None.

    One compiled call, counter included: module forward+backward on (64, 16), interleaved,
    2 threads: 78.5 -> 66.6 us against the update and a separate NumPy ``+= 1`` on the
    counter's 0-d view (that increment alone cost ~10 us inside a forward+backward step).
    """
    running_mean, running_var, tracked, momentum = running
    if running_mean.dtype.char not in "fd":
        numpy_running_step(running_mean, running_var, mean, var, count, momentum)
        if tracked is not None:
            tracked += 1
    elif tracked is not None:
        running_step_counted(running_mean, running_var, tracked, mean, var, float(momentum), int(count))
    else:
        running_step(running_mean, running_var, mean, var, float(momentum), int(count))


def _check_running(running: object, x: np.ndarray) -> None:
    """Raise, naming the entry, unless ``running`` is an updatable ``(running_mean, running_var,
    num_batches_tracked, momentum)`` for x's channels (checked before anything is computed)."""
    _check_running_entries(running, x.shape[1])
    _check_running_count(x)


def _check_running_entries(running: object, channels: int) -> None:
    if not isinstance(running, tuple) or len(running) != 4:
        raise TypeError(
            "running: expected a tuple (running_mean, running_var, num_batches_tracked, momentum), "
            f"got {type(running).__name__}"
        )
    running_mean, running_var, tracked, momentum = running
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        if (
            type(v) is not np.ndarray
            or v.shape != (channels,)
            or v.dtype.kind != "f"
            or not v.flags.writeable
        ):
            got = f"{v.dtype} array of shape {v.shape}" if isinstance(v, np.ndarray) else type(v).__name__
            raise ValueError(
                f"{name}: expected a writeable floating-point array of shape ({channels},) (one value "
                f"per channel of x), got {got}"
            )
    if running_var.dtype != running_mean.dtype:
        raise TypeError(
            f"running_var: expected running_mean's dtype {running_mean.dtype}, got {running_var.dtype}"
        )
    if tracked is not None and (
        type(tracked) is not np.ndarray or tracked.shape != () or tracked.dtype.kind not in "iu"
    ):
        got = (
            f"{tracked.dtype} array of shape {tracked.shape}"
            if isinstance(tracked, np.ndarray)
            else type(tracked).__name__
        )
        raise ValueError(f"num_batches_tracked: expected None or a 0-d integer array, got {got}")
    if type(momentum) not in (float, int) and not isinstance(momentum, np.floating):
        raise TypeError(f"momentum: expected a number, got {type(momentum).__name__}")


def _check_running_count(x: np.ndarray) -> None:
    if x.size and x.size == x.shape[1]:
        raise ValueError(
            f"x: expected more than one value per channel to update the running variance "
            f"(Bessel's correction divides by m - 1), got shape {x.shape}"
        )
