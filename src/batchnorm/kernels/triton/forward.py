"""Triton kernels: the normalization pass, ``y = act((x - mean) * invstd * gamma + beta)``.

One read of x and one write of y per element: the training forward runs it after the
statistics (``stats``); inference runs it alone with the running estimates as ``mean`` and
``invstd``. The tiling is the one of the statistics kernels (``ncs``: program ``c * K + k``
walks tiles of channel c; ``rc``: program ``(cb, k)`` walks rows for a block of channels), so
per-channel parameters are loaded once per program.

Numerical choice: ``(x - mean) * scale + beta``, not ``x * scale + (beta - mean * scale)``.
The folded form saves one subtraction but cancels catastrophically at large offsets
(mean 1e4, invstd 1e2: ``x * scale`` ~ 1e6, whose float32 ulp is 0.06 of a unit of y).
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.act import activate
from batchnorm.kernels.triton.stats import finish_stats, merge_partials, update_running


@triton.jit
def channel_stats_or_given(
    x_ptr, mean_ptr, var_ptr, invstd_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    ch, ch_mask, k, K, shift_stride, eps_hi, eps_lo, run_mean_ptr, run_var_ptr, momentum_hi, momentum_lo,
    FROM_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
):  # fmt: skip
    """(mean, invstd) of channels ``ch``: given, or merged from the K statistics partials.

    Merged (the training forward): every program merges its channels' K partials itself
    (``stats.merge_partials``) instead of waiting for a separate combine launch, and program
    k = 0 stores mean, var and invstd (and updates the running buffers when ``UPDATE_RUNNING``).
    The merge reads ``3 * K`` values per channel from L2.
    """
    if FROM_PARTIALS:
        mean, m2, count = merge_partials(part_mean_ptr, part_m2_ptr, part_count_ptr, ch, ch_mask, K,
                                         BLOCK_K, ACC)  # fmt: skip
        mean, var, invstd = finish_stats(
            x_ptr, mean, m2, count, ch, ch_mask, shift_stride, eps_hi, eps_lo, ACC
        )
        if k == 0:
            tl.store(mean_ptr + ch, mean, mask=ch_mask)
            tl.store(var_ptr + ch, var, mask=ch_mask)
            tl.store(invstd_ptr + ch, invstd, mask=ch_mask)
            if UPDATE_RUNNING:
                update_running(
                    run_mean_ptr, run_var_ptr, mean, var, count, ch, ch_mask, momentum_hi, momentum_lo, ACC
                )
    else:
        mean = tl.load(mean_ptr + ch, mask=ch_mask, other=0).to(ACC)
        invstd = tl.load(invstd_ptr + ch, mask=ch_mask, other=0).to(ACC)
    return mean, invstd


@triton.jit
def _scale_and_beta(
    invstd, weight_ptr, bias_ptr, ch, ch_mask,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    scale = invstd
    if HAS_WEIGHT:
        scale = scale * tl.load(weight_ptr + ch, mask=ch_mask, other=0).to(ACC)
    beta = tl.zeros(ch.shape, ACC)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + ch, mask=ch_mask, other=0).to(ACC)
    return scale, beta


@triton.jit
def normalize_ncs_kernel(
    x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope,
    N, C, S, tiles_per_prog,
    var_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr, eps_hi, eps_lo,
    run_mean_ptr, run_var_ptr, momentum_hi, momentum_lo,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
    FROM_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_k = tl.num_programs(0) // C
    c = pid // num_k
    k = pid % num_k
    # The channel's scalars as 1-element vectors, so the helpers serve both layouts.
    one = tl.arange(0, 1) + c
    mean, invstd = channel_stats_or_given(
        x_ptr, mean_ptr, var_ptr, invstd_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
        one, one < C, k, num_k, S, eps_hi, eps_lo, run_mean_ptr, run_var_ptr, momentum_hi, momentum_lo,
        FROM_PARTIALS, BLOCK_K, ACC, UPDATE_RUNNING,
    )  # fmt: skip
    scale, beta = _scale_and_beta(invstd, weight_ptr, bias_ptr, one, one < C, HAS_WEIGHT, HAS_BIAS, ACC)
    s_blocks = tl.cdiv(S, BLOCK_S)
    n_tiles = tl.cdiv(N, BLOCK_N) * s_blocks
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_S)
    t_end = tl.minimum((k + 1) * tiles_per_prog, n_tiles)
    for t in range(k * tiles_per_prog, t_end):
        n = (t // s_blocks) * BLOCK_N + rows
        s = (t % s_blocks) * BLOCK_S + cols
        mask = (n < N)[:, None] & (s < S)[None, :]
        offs = (n.to(tl.int64) * C + c)[:, None] * S + s[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        y = activate((x - mean[None, :]) * scale[None, :] + beta[None, :], slope, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normalize_rc_kernel(
    x_ptr, y_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope,
    R, C, rows_per_prog,
    var_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr, eps_hi, eps_lo,
    run_mean_ptr, run_var_ptr, momentum_hi, momentum_lo,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    FROM_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    k = tl.program_id(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    mean, invstd = channel_stats_or_given(
        x_ptr, mean_ptr, var_ptr, invstd_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
        ch, ch_mask, k, tl.num_programs(1), 1, eps_hi, eps_lo,
        run_mean_ptr, run_var_ptr, momentum_hi, momentum_lo, FROM_PARTIALS, BLOCK_K, ACC, UPDATE_RUNNING,
    )  # fmt: skip
    scale, beta = _scale_and_beta(invstd, weight_ptr, bias_ptr, ch, ch_mask, HAS_WEIGHT, HAS_BIAS, ACC)
    rows = tl.arange(0, BLOCK_R)
    r_end = tl.minimum((k + 1) * rows_per_prog, R)
    for r0 in range(k * rows_per_prog, r_end, BLOCK_R):
        r = r0 + rows
        mask = (r < r_end)[:, None] & ch_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + ch[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC)
        y = activate((x - mean[None, :]) * scale[None, :] + beta[None, :], slope, ACT)
        tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
