"""Dispatch for the Triton kernels: layouts, dtypes, block sizes, launches.

The contract of ``batchnorm.kernels`` on torch tensors (CUDA, or CPU under
``TRITON_INTERPRET=1``)::

    forward_train(x, weight, bias, eps, running=None) -> (y, mean, var, invstd)   var biased
    normalize(x, mean, invstd, weight, bias)     -> y = (x - mean) * invstd * weight + bias
    channel_stats(x)                             -> (mean, var)
    backward_reduce(dy, x, mean, invstd)         -> (sum_dy, sum_dy_xhat)
    backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count) -> dx
    backward(dy, x, mean, invstd, weight)        -> (dx, dweight, dbias)

Inputs: float16, bfloat16, float32 or float64, shape ``(N, C, *spatial)``, any strides.
Outputs keep x's dtype and memory format; statistics and sums are float32 (float64 for float64
input). ``weight``/``bias`` may be ``None``.

Layouts: a contiguous tensor runs the ``ncs`` kernels on its ``(N, C, S)`` view; a tensor whose
channel axis is innermost (channels-last, or any ``(N, C)``) runs the ``rc`` kernels on its
``(R, C)`` view; anything else is copied to contiguous first. ``dy`` is brought to x's strides.

Launches: the training forward is two (statistics partials; a normalize pass whose programs
merge the partials, program k = 0 storing mean/var/invstd and updating the running buffers),
the backward two (sum partials; dx adding them up), through ``_launch`` (compiled kernels
reused without Triton's binder). Where the merge work ``C * K^2`` is large (channels-last with
hundreds of programs per channel block) a separate combine launch is cheaper and is used.
On an H100 the host time of these launches, not the kernels, limits small layers: see
docs/benchmarks.md, GPU section, and ``batchnorm._torch_ops.cuda_uses_torch``.

Block sizes (``LaunchConfig``, reasoned; on an H100 they reached 84-92% of the memory-traffic
bound for float32 NCHW tensors of 200 MB; ``_tune`` can pick among candidates on a GPU):

* A tile is 8 KiB of input per program per loop step (2048 float32, 4096 bf16): with 4 warps
  that is 16 float32 or bf16x16 per thread, enough for 128-bit loads and for the loads of one
  step to hide the latency of the previous one, at ~50 registers of accumulators per thread.
* ncs: the tile is ``BLOCK_N x BLOCK_S`` with ``BLOCK_S = next_pow2(S)`` capped at the tile, so
  small images (7x7 -> 64) still fill a tile with several rows; rc: ``BLOCK_C`` channels (<= 128,
  512 contiguous bytes in float32) by ``BLOCK_R`` rows.
* Split: each channel's tiles are cut into K contiguous ranges so that ``C * K`` (ncs) or
  ``ceil(C / BLOCK_C) * K`` (rc) programs reach ``programs_per_sm * SMs`` (8 per SM: about one
  full wave at 4 warps and moderate registers), never more programs than tiles. This is what
  makes (256, 3, 224, 224) fast: 3 channels become ~1000 programs instead of 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import triton.language as tl

from batchnorm.kernels.triton import _tune, stats
from batchnorm.kernels.triton import backward as bwd
from batchnorm.kernels.triton import forward as fwd
from batchnorm.kernels.triton._launch import INTERPRETED, launch
from batchnorm.kernels.triton.act import ACT_CODES

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes and split factor of the launches (see the module docstring for the reasoning)."""

    tile_bytes: int = 8192  # input bytes per program per loop step
    programs_per_sm: int = 8  # split reductions until C * K reaches this many programs per SM
    max_block_c: int = 128  # rc layout: channels per program
    num_warps: int | None = None  # None: 16 elements of a tile per thread (4 warps at 2048)
    sm_count: int | None = None  # None: ask the device (1 on CPU under the interpreter)


@dataclass(frozen=True)
class Plan:
    """One launch geometry: layout, block shape, programs per channel (block) and work each."""

    layout: str  # "ncs" or "rc"
    block_a: int  # BLOCK_N (ncs) or BLOCK_R (rc)
    block_b: int  # BLOCK_S (ncs) or BLOCK_C (rc)
    split: int  # K: programs per channel (ncs) or per channel block (rc)
    per_prog: int  # tiles (ncs) or rows (rc) per program
    grid: tuple[int, ...]
    num_warps: int


@dataclass(frozen=True)
class _View:
    """x seen in its canonical layout: ``(N, C, S)`` for ncs, ``(R, C)`` for rc."""

    x: torch.Tensor  # dense tensor with x's shape; kernels index it from data_ptr
    layout: str
    n: int  # N (ncs) or R (rc)
    c: int
    s: int  # S (ncs), 1 (rc)

    @property
    def count(self) -> int:
        return self.n * self.s


def _np2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


_SM_COUNTS: dict[int | None, int] = {}


def _sm_count(device: torch.device, config: LaunchConfig) -> int:
    if config.sm_count is not None:
        return config.sm_count
    if device.type != "cuda":
        return 1
    count = _SM_COUNTS.get(device.index)
    if count is None:
        count = _SM_COUNTS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


_PLANS: dict[tuple, Plan] = {}


def plan(view: _View, itemsize: int, config: LaunchConfig, device: torch.device) -> Plan:
    """Block shape and split factor for ``view`` (cached: a module calls this every step)."""
    key = (view.layout, view.n, view.c, view.s, itemsize, config, device)
    cached = _PLANS.get(key)
    if cached is None:
        cached = _PLANS[key] = _make_plan(view, itemsize, config, device)
    return cached


def _make_plan(view: _View, itemsize: int, config: LaunchConfig, device: torch.device) -> Plan:
    """The reasoning is in the module docstring."""
    tile = max(2, config.tile_bytes // itemsize)
    # 16 elements per thread: bf16 tiles (4096) get 8 warps so the float32 Welford
    # accumulators (3 per element) stay in registers.
    warps = config.num_warps or max(1, min(16, _np2(tile) // 512))
    target = max(1, config.programs_per_sm * _sm_count(device, config))
    if view.layout == "ncs":
        block_s = min(_np2(view.s), _np2(tile))
        block_n = min(_np2(view.n), max(1, _np2(tile) // block_s))
        tiles = math.ceil(view.n / block_n) * math.ceil(view.s / block_s)
        split = min(tiles, max(1, math.ceil(target / view.c)))
        per_prog = math.ceil(tiles / split)
        split = math.ceil(tiles / per_prog)
        return Plan("ncs", block_n, block_s, split, per_prog, (view.c * split,), warps)
    block_c = min(_np2(view.c), _np2(config.max_block_c))
    block_r = min(_np2(view.n), max(1, _np2(tile) // block_c))
    c_blocks = math.ceil(view.c / block_c)
    row_tiles = math.ceil(view.n / block_r)
    split = min(row_tiles, max(1, math.ceil(target / c_blocks)))
    per_prog = math.ceil(row_tiles / split) * block_r  # whole row tiles: aligned loads
    split = math.ceil(view.n / per_prog)
    return Plan("rc", block_r, block_c, split, per_prog, (c_blocks, split), warps)


def _check_tensor(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _SUPPORTED:
        raise TypeError(
            f"{name}: expected float16, bfloat16, float32 or float64, got {t.dtype}; "
            f"convert with {name}.float()"
        )
    if t.device.type == "cpu" and not INTERPRETED:
        raise ValueError(
            f"{name}: the Triton kernels need a CUDA tensor, got one on the CPU; move it with "
            f"{name}.cuda(), use batchnorm.kernels for CPU tensors, or set TRITON_INTERPRET=1 "
            "before importing triton to run these kernels in Triton's interpreter"
        )


def _view(x: torch.Tensor) -> _View:
    _check_tensor("x", x)
    if x.dim() < 2:
        raise ValueError(
            f"x: expected shape (N, C) or (N, C, *spatial), got {x.dim()}-D shape {tuple(x.shape)}"
        )
    n, c = x.shape[0], x.shape[1]
    s = math.prod(x.shape[2:])
    if n * s == 0 or c == 0:
        raise ValueError(
            f"x: expected at least one value per channel, got shape {tuple(x.shape)} "
            f"({n * s} values for each of {c} channels)"
        )
    if s == 1 and x.is_contiguous():
        return _View(x, "rc", n, c, 1)
    if x.is_contiguous():
        return _View(x, "ncs", n, c, s)
    if x.movedim(1, -1).is_contiguous():
        return _View(x, "rc", n * s, c, 1)
    return _View(x.contiguous(), "ncs", n, c, s)


def _like(name: str, t: torch.Tensor, view: _View) -> torch.Tensor:
    """``t`` with the shape and strides of ``view.x`` (copied only when they differ)."""
    _check_tensor(name, t)
    if t.shape != view.x.shape:
        raise ValueError(f"{name}: expected shape {tuple(view.x.shape)} (x's shape), got {tuple(t.shape)}")
    if t.stride() == view.x.stride():
        return t
    return torch.empty_like(view.x, dtype=t.dtype).copy_(t)


def _channel_vector(name: str, t: torch.Tensor | None, view: _View) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(
            f"{name}: expected a torch.Tensor of shape ({view.c},) or None, got {type(t).__name__}"
        )
    if t.shape != (view.c,):
        raise ValueError(
            f"{name}: expected shape ({view.c},) (one value per channel of x), got {tuple(t.shape)}"
        )
    if t.device != view.x.device:
        raise ValueError(f"{name}: expected a tensor on {view.x.device} (x's device), got {t.device}")
    return t.detach().contiguous()


def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _acc(x: torch.Tensor) -> tl.dtype:
    return tl.float64 if x.dtype == torch.float64 else tl.float32


def _combine_blocks(c: int, k: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_K) of the combine kernels: up to 64 partials by 2048 / BLOCK_K channels."""
    block_k = min(_np2(k), 64)
    return max(1, min(_np2(c), 2048 // block_k)), block_k


def _config(config: LaunchConfig | None, view: _View) -> LaunchConfig:
    """The given config, else the defaults, else (opt-in, CUDA only) the measured best of ``_tune``."""
    if config is not None:
        return config
    if _tune.enabled(view.x):
        return _tune.best_config(view, LaunchConfig())
    return LaunchConfig()


def _f32_pair(value: float) -> tuple[float, float]:
    """``(hi, lo)``, both float32-representable, with ``hi + lo == value`` to ~1e-16 relative.

    Triton passes a Python float as a float32 scalar: eps=1e-5 became 9.99999974738e-06, which
    moved a float64 invstd by up to 1.3e-8 (a constant channel), far outside float64's
    tolerance. The kernels add both parts in their accumulation dtype.
    """
    hi = float(np.float32(value))
    return hi, float(np.float32(value - hi))


# The normalize / dx programs merge the partials themselves (one launch less) while the merge
# work, ``C * K * K`` partials read over all programs, stays under this. Above it, channels-last
# on an H100 measured 140 -> 451 us for the fused normalize of (64, 256, 56, 56) (K = 528): the
# separate combine launch is cheaper there.
_MERGE_WORK_LIMIT = 1 << 21


def _merges_in_pass(view: _View, p: Plan) -> bool:
    return view.c * p.split * p.split <= _MERGE_WORK_LIMIT


def _merge_block_k(p: Plan) -> int:
    """BLOCK_K of the partial merges inside the normalize and dx programs: at most 2048 values
    (``BLOCK_C x BLOCK_K``) in flight per program, next to the tile's registers."""
    block_c = p.block_b if p.layout == "rc" else 1
    return max(1, min(_np2(p.split), 64, 2048 // block_c))


def _tiling(view: _View, p: Plan) -> tuple[tuple[int, ...], dict[str, int]]:
    """The kernels' geometry arguments and block sizes for plan ``p`` on ``view``."""
    if p.layout == "ncs":
        return (view.n, view.c, view.s, p.per_prog), {"BLOCK_N": p.block_a, "BLOCK_S": p.block_b}
    return (view.n, view.c, p.per_prog), {"BLOCK_R": p.block_a, "BLOCK_C": p.block_b}


def _stat_partials(view: _View, p: Plan) -> torch.Tensor:
    """Launch the statistics partials of ``view``: ``(3, C * K)`` (mean of x - shift, M2, count)."""
    x = view.x
    parts = torch.empty((3, view.c * p.split), dtype=_stat_dtype(x), device=x.device)
    kernel = stats.stats_ncs_kernel if p.layout == "ncs" else stats.stats_rc_kernel
    geometry, blocks = _tiling(view, p)
    launch(kernel, p.grid, (x, *parts, *geometry), p.num_warps, **blocks, ACC=_acc(x))
    return parts


def _running_args(view: _View, running: tuple | None) -> tuple:
    """Kernel arguments ``(run_mean, run_var, momentum_hi, momentum_lo)`` (unused placeholders
    without ``running``)."""
    if running is None:
        return (view.x, view.x, 0.0, 0.0)
    run_mean, run_var, momentum = running
    return (run_mean, run_var, *_f32_pair(momentum))


def _stats(
    view: _View, eps: float, config: LaunchConfig, running: tuple | None = None
) -> tuple[torch.Tensor, ...]:
    """(mean, var, invstd) of ``view``: split Welford, then Chan's combine (two launches).

    ``running = (running_mean, running_var, momentum)``: the combine also updates the buffers.
    """
    x = view.x
    p = plan(view, x.element_size(), config, x.device)
    parts = _stat_partials(view, p)
    out = torch.empty((3, view.c), dtype=_stat_dtype(x), device=x.device)
    block_c, block_k = _combine_blocks(view.c, p.split)
    # First value of each channel: the Welford shift the partial kernels subtracted.
    shift_stride = view.s if p.layout == "ncs" else 1
    args = (x, *parts, *out, view.c, p.split, shift_stride, *_f32_pair(eps), *_running_args(view, running))
    launch(
        stats.stats_combine_kernel, (math.ceil(view.c / block_c),), args, None,
        BLOCK_C=block_c, BLOCK_K=block_k, ACC=_acc(x), UPDATE_RUNNING=running is not None,
    )  # fmt: skip
    return out[0], out[1], out[2]


def _normalize(
    view: _View, mean, invstd, weight, bias, act: int, slope: float, config: LaunchConfig,
    merge: tuple | None = None,
) -> torch.Tensor:  # fmt: skip
    """One pass ``y = act((x - mean) * invstd * weight + bias)``.

    ``merge = (parts, var, eps, running)``: mean, var and invstd are not given but merged from
    the statistics partials inside the pass and written to ``mean``, ``var``, ``invstd``; with
    ``running = (running_mean, running_var, momentum)`` the buffers are updated too.
    """
    x = view.x
    y = torch.empty_like(x)
    p = plan(view, x.element_size(), config, x.device)
    w = x if weight is None else weight  # never read when HAS_WEIGHT is False
    b = x if bias is None else bias
    if merge is None:
        running = None
        tail = (x, x, x, x, 0.0, 0.0, *_running_args(view, None))  # never read without FROM_PARTIALS
    else:
        parts, var, eps, running = merge
        tail = (var, *parts, *_f32_pair(eps), *_running_args(view, running))
    common = dict(
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, ACC=_acc(x),
        FROM_PARTIALS=merge is not None, BLOCK_K=_merge_block_k(p), UPDATE_RUNNING=running is not None,
    )  # fmt: skip
    kernel = fwd.normalize_ncs_kernel if p.layout == "ncs" else fwd.normalize_rc_kernel
    geometry, blocks = _tiling(view, p)
    launch(kernel, p.grid, (x, y, mean, invstd, w, b, float(slope), *geometry, *tail), p.num_warps, **blocks,
           **common)  # fmt: skip
    return y


def _backward_launch(
    kind: str, view: _View, dy, mean, invstd, weight, bias, act, slope, from_output, config, extra
):
    """Launch ``backward_reduce_*`` (kind "reduce": the sums), ``backward_dx_*`` (kind "dx",
    ``extra = (sum_dz, sum_dz_xhat, count)``), or both (kind "both": dx adds up the reduce's
    partials itself, no combine launch; returns ``(dx, sum_dz, sum_dz_xhat)``)."""
    v = view.x
    p = plan(view, max(v.element_size(), dy.element_size()), config, v.device)
    common = dict(
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT=act, FROM_OUTPUT=from_output,
        ACC=_acc(v),
    )  # fmt: skip
    w = v if weight is None else weight
    b = v if bias is None else bias
    ncs = p.layout == "ncs"
    geometry, blocks = _tiling(view, p)
    if kind != "dx":
        parts = torch.empty((2, view.c * p.split), dtype=_stat_dtype(v), device=v.device)
        kernel = bwd.backward_reduce_ncs_kernel if ncs else bwd.backward_reduce_rc_kernel
        args = (dy, v, mean, invstd, w, b, float(slope), parts[0], parts[1], *geometry)
        launch(kernel, p.grid, args, p.num_warps, **blocks, **common)
        sums = torch.empty((2, view.c), dtype=_stat_dtype(v), device=v.device)
        if kind == "reduce":
            block_c, block_k = _combine_blocks(view.c, p.split)
            grid = (math.ceil(view.c / block_c),)
            args = (*parts, *sums, view.c, p.split)
            launch(bwd.sums_combine_kernel, grid, args, None, BLOCK_C=block_c, BLOCK_K=block_k, ACC=_acc(v))
            return sums[0], sums[1]
        extra = (sums[0], sums[1], view.count)
    else:
        parts = (v, v)  # never read without FROM_PARTIALS
    dx = torch.empty_like(v)
    kernel = bwd.backward_dx_ncs_kernel if ncs else bwd.backward_dx_rc_kernel
    args = (dy, v, dx, mean, invstd, w, b, float(slope), *extra, *geometry, parts[0], parts[1])
    launch(kernel, p.grid, args, p.num_warps, **blocks, **common, FROM_PARTIALS=kind == "both",
           BLOCK_K=_merge_block_k(p))  # fmt: skip
    return dx if kind == "dx" else (dx, extra[0], extra[1])


def act_code(act: str | int) -> int:
    """The kernels' code for an activation name (``identity``, ``relu``, ``leaky_relu``, ``silu``)."""
    if isinstance(act, int) and act in ACT_CODES.values():
        return act
    if act not in ACT_CODES:
        raise ValueError(f"act: expected one of {sorted(ACT_CODES)}, got {act!r}")
    return ACT_CODES[act]


def channel_stats(
    x: torch.Tensor, *, config: LaunchConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``mean = sum x / m`` and biased ``var = sum (x - mean)^2 / m``, m = N * prod(spatial).

    Shape:
        x: ``(N, C, *spatial)``; mean, var: ``(C,)`` float32 (float64 for float64 x).
    """
    # invstd is discarded; eps=1 keeps a constant channel from dividing by zero on the way.
    view = _view(x)
    mean, var, _ = _stats(view, 1.0, _config(config, view))
    return mean, var


def forward_train(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float,
    *, running: tuple | None = None, config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Training forward with batch statistics: ``(y, mean, var, invstd)``, var biased::

        invstd = 1 / sqrt(var + eps),  y = (x - mean) * invstd * weight + bias

    ``running = (running_mean, running_var, momentum)``: also updates those buffers in place,
    inside the kernels, as torch.nn does (``(1 - momentum) * running + momentum * batch``, the
    variance unbiased by ``m / (m - 1)``).

    Shape:
        x, y: ``(N, C, *spatial)`` (y keeps x's dtype and memory format); the rest ``(C,)``.
    """
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    view = _view(x)
    weight, bias = _channel_vector("weight", weight, view), _channel_vector("bias", bias, view)
    return _forward_act(view, weight, bias, eps, 0, 0.0, _config(config, view), _running(running, view))


def _running(running: tuple | None, view: _View) -> tuple | None:
    """Checked ``(running_mean, running_var, momentum)``: buffers updated in place must be dense."""
    if running is None:
        return None
    run_mean, run_var, momentum = running
    for name, t in (("running_mean", run_mean), ("running_var", run_var)):
        _channel_vector(name, t, view)
        if not t.is_contiguous() or t.requires_grad:
            raise ValueError(f"{name}: expected a contiguous buffer without requires_grad (updated in place)")
    return run_mean, run_var, float(momentum)


def normalize(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
    bias: torch.Tensor | None, *, config: LaunchConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """``y = (x - mean) * invstd * weight + bias`` in one pass (inference, or after the stats).

    Shape:
        x, y: ``(N, C, *spatial)``; mean, invstd, weight, bias: ``(C,)``.
    """
    view = _view(x)
    vecs = [_channel_vector(n, t, view) for n, t in
            (("mean", mean), ("invstd", invstd), ("weight", weight), ("bias", bias))]  # fmt: skip
    return _normalize(view, *vecs, 0, 0.0, _config(config, view))


def backward_reduce(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    *, config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(sum_dy, sum_dy_xhat)`` per channel, ``x_hat = (x - mean) * invstd``.

    Shape:
        dy, x: ``(N, C, *spatial)``; mean, invstd and the sums: ``(C,)``.
    """
    view = _view(x)
    mean, invstd = _channel_vector("mean", mean, view), _channel_vector("invstd", invstd, view)
    return _backward_launch(
        "reduce",
        view,
        _like("dy", dy, view),
        mean,
        invstd,
        None,
        None,
        0,
        0.0,
        False,
        _config(config, view),
        (),
    )


def backward_dx(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    weight: torch.Tensor | None, sum_dy: torch.Tensor, sum_dy_xhat: torch.Tensor, count: int,
    *, config: LaunchConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """``dx = weight * invstd * (dy - sum_dy / count - x_hat * sum_dy_xhat / count)``.

    ``count`` is the number of values per channel the sums were taken over (larger than x's
    own under SyncBatchNorm, where the sums are all-reduced).

    Shape:
        dy, x, dx: ``(N, C, *spatial)`` (dx keeps x's dtype and memory format); the rest ``(C,)``.
    """
    view = _view(x)
    if int(count) < 1:
        raise ValueError(f"count: expected the number of values per channel (>= 1), got {count}")
    named = {"mean": mean, "invstd": invstd, "weight": weight, "sum_dy": sum_dy, "sum_dy_xhat": sum_dy_xhat}
    mean, invstd, weight, sum_dy, sum_dy_xhat = (_channel_vector(n, t, view) for n, t in named.items())
    return _backward_launch(
        "dx", view, _like("dy", dy, view), mean, invstd, weight, None, 0, 0.0, False, _config(config, view),
        (sum_dy, sum_dy_xhat, int(count)),
    )  # fmt: skip


def backward(
    dy: torch.Tensor, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, weight: torch.Tensor | None,
    *, config: LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Training backward with batch statistics: ``(dx, dweight, dbias)``::

        dbias = sum dy,  dweight = sum dy * x_hat
        dx = weight * invstd * (dy - dbias / m - x_hat * dweight / m)

    Shape:
        dy, x, dx: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    view = _view(x)
    mean, invstd, weight = (
        _channel_vector(n, t, view) for n, t in (("mean", mean), ("invstd", invstd), ("weight", weight))
    )
    return _backward_act(
        view, _like("dy", dy, view), mean, invstd, weight, None, 0, 0.0, False, _config(config, view)
    )


def _forward_act(
    view: _View, weight, bias, eps: float, code: int, slope: float, cfg: LaunchConfig,
    running: tuple | None = None,
):  # fmt: skip
    """Training forward in two launches: the statistics partials, then a normalize pass whose
    programs merge them (a launch costs ~30 us of host time, more than a small layer's kernels)."""
    x = view.x
    p = plan(view, x.element_size(), cfg, x.device)
    if not _merges_in_pass(view, p):
        mean, var, invstd = _stats(view, eps, cfg, running)
        return _normalize(view, mean, invstd, weight, bias, code, slope, cfg), mean, var, invstd
    parts = _stat_partials(view, p)
    mean, var, invstd = torch.empty((3, view.c), dtype=_stat_dtype(x), device=x.device)
    y = _normalize(view, mean, invstd, weight, bias, code, slope, cfg, merge=(parts, var, eps, running))
    return y, mean, var, invstd


def _backward_act(view: _View, dy, mean, invstd, weight, bias, code, slope, from_output, cfg: LaunchConfig):
    """Training backward in two launches: the sums' partials, then dx (which adds them up)."""
    p = plan(view, max(view.x.element_size(), dy.element_size()), cfg, view.x.device)
    if not _merges_in_pass(view, p):
        args = (view, dy, mean, invstd, weight, bias, code, slope, from_output, cfg)
        sum_dz, sum_dz_xhat = _backward_launch("reduce", *args, ())
        dx = _backward_launch("dx", *args, (sum_dz, sum_dz_xhat, view.count))
        return dx, sum_dz_xhat, sum_dz
    dx, sum_dz, sum_dz_xhat = _backward_launch(
        "both", view, dy, mean, invstd, weight, bias, code, slope, from_output, cfg, ()
    )
    return dx, sum_dz_xhat, sum_dz
