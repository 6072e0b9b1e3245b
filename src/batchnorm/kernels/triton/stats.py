"""Triton kernels: per-channel mean and biased variance by a split reduction.

Two canonical layouts (``_dispatch`` reshapes every input into one of them)::

    ncs: (N, C, S), S contiguous       NCHW, NCL, NCDHW
    rc:  (R, C),    C contiguous       (N, C) and channels-last, R = N * prod(spatial)

Step 1 (``stats_ncs_kernel`` / ``stats_rc_kernel``): program ``(c, k)`` reduces a contiguous
range of tiles of channel(s) ``c`` into a partial ``(count, mean, M2)``. Step 2
(``stats_combine_kernel``) merges the K partials of each channel with Chan's formula::

    n = n_a + n_b
    mean = mean_a + (mean_b - mean_a) * n_b / n
    M2 = M2_a + M2_b + (mean_b - mean_a)^2 * n_a * n_b / n
    var = M2 / n,  invstd = 1 / sqrt(var + eps)

Numerical choices, made here:

* Every lane of a tile runs its own Welford update (``mean += d / n``, ``M2 += d * (x - mean)``)
  and the lanes are merged with the same Chan formula (``tl.reduce``). Never
  ``E[x^2] - E[x]^2``, which loses every digit at mean 1e4, std 1e-2 in float32.
* Before the update each value is *shifted* by one sample of its channel (``x[0, c, 0]``):
  ``x - shift`` is exact for values within a factor 2 of the shift (Sterbenz), so a float32
  Welford sees data of the size of the standard deviation, not of the offset. Without the shift
  a float32 Welford at mean 1e4, std 1e-2 drifts by ulp(1e4) ~ 1e-3 per update and the variance
  came out 3% wrong (measured in the interpreter); with it, the error is at float32 rounding.
* Accumulation is in ``ACC`` (float32; float64 for float64 input); fp16/bf16 are upcast on load.

Kernels validate nothing: ``_dispatch`` checks shapes, dtypes and picks the block sizes.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def welford_combine(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    """Chan's pairwise merge of two (mean, M2, count) summaries; empty summaries are neutral."""
    n = n_a + n_b
    w_b = tl.where(n > 0, n_b / tl.maximum(n, 1), 0)
    delta = mean_b - mean_a
    return mean_a + delta * w_b, m2_a + m2_b + delta * delta * n_a * w_b, n


@triton.jit
def _welford_update(mean, m2, count, x, mask):
    """One Welford step per lane; masked lanes keep their summary."""
    new_count = count + mask.to(count.dtype)
    delta = x - mean
    new_mean = mean + tl.where(mask, delta / tl.maximum(new_count, 1), 0)
    new_m2 = m2 + tl.where(mask, delta * (x - new_mean), 0)
    return new_mean, new_m2, new_count


@triton.jit
def stats_ncs_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    N, C, S, tiles_per_prog,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Program ``pid = c * K + k``: partial (mean of x - shift, M2, count) over tiles of channel c."""
    pid = tl.program_id(0)
    num_k = tl.num_programs(0) // C
    c = pid // num_k
    k = pid % num_k
    s_blocks = tl.cdiv(S, BLOCK_S)
    n_tiles = tl.cdiv(N, BLOCK_N) * s_blocks
    shift = tl.load(x_ptr + c.to(tl.int64) * S).to(ACC)
    mean = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    m2 = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    count = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_S)
    t_end = tl.minimum((k + 1) * tiles_per_prog, n_tiles)
    for t in range(k * tiles_per_prog, t_end):
        n = (t // s_blocks) * BLOCK_N + rows
        s = (t % s_blocks) * BLOCK_S + cols
        mask = (n < N)[:, None] & (s < S)[None, :]
        offs = (n.to(tl.int64) * C + c)[:, None] * S + s[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - shift
        mean, m2, count = _welford_update(mean, m2, count, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 1, welford_combine)
    mean, m2, count = tl.reduce((mean, m2, count), 0, welford_combine)
    tl.store(part_mean_ptr + pid, mean)
    tl.store(part_m2_ptr + pid, m2)
    tl.store(part_count_ptr + pid, count)


@triton.jit
def stats_rc_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr,
    R, C, rows_per_prog,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """Program ``(cb, k)``: partials of channels ``cb*BLOCK_C...`` over rows ``[k*rows_per_prog, ...)``.

    Partials are stored channel-major (``c * K + k``) as in the ncs kernel, so one combine
    kernel serves both layouts.
    """
    cb = tl.program_id(0)
    k = tl.program_id(1)
    num_k = tl.num_programs(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    shift = tl.load(x_ptr + ch, mask=ch_mask, other=0).to(ACC)
    mean = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    m2 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    count = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    rows = tl.arange(0, BLOCK_R)
    r_end = tl.minimum((k + 1) * rows_per_prog, R)
    for r0 in range(k * rows_per_prog, r_end, BLOCK_R):
        r = r0 + rows
        mask = (r < r_end)[:, None] & ch_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + ch[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0).to(ACC) - shift[None, :]
        mean, m2, count = _welford_update(mean, m2, count, x, mask)
    mean, m2, count = tl.reduce((mean, m2, count), 0, welford_combine)
    out = ch * num_k + k
    tl.store(part_mean_ptr + out, mean, mask=ch_mask)
    tl.store(part_m2_ptr + out, m2, mask=ch_mask)
    tl.store(part_count_ptr + out, count, mask=ch_mask)


@triton.jit
def merge_partials(part_mean_ptr, part_m2_ptr, part_count_ptr, ch, ch_mask, K,
                   BLOCK_K: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    """Chan-merge the K partials ``c * K + k`` of channels ``ch``: (mean of x - shift, M2, count)."""
    mean = tl.zeros(ch.shape, ACC)
    m2 = tl.zeros(ch.shape, ACC)
    count = tl.zeros(ch.shape, ACC)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask = ch_mask[:, None] & (k0 + ks < K)[None, :]
        offs = ch[:, None] * K + (k0 + ks)[None, :]
        p_mean = tl.load(part_mean_ptr + offs, mask=mask, other=0)
        p_m2 = tl.load(part_m2_ptr + offs, mask=mask, other=0)
        p_count = tl.load(part_count_ptr + offs, mask=mask, other=0)
        b_mean, b_m2, b_count = tl.reduce((p_mean, p_m2, p_count), 1, welford_combine)
        mean, m2, count = welford_combine(mean, m2, count, b_mean, b_m2, b_count)
    return mean, m2, count


@triton.jit
def finish_stats(x_ptr, mean, m2, count, ch, ch_mask, shift_stride, eps_hi, eps_lo, ACC: tl.constexpr):
    """(mean, var, invstd) from a merged summary: add back the shift ``x[shift_stride * c]``.

    ``eps = eps_hi + eps_lo``, two float32 scalars (see ``_dispatch._f32_pair``).
    """
    shift = tl.load(x_ptr + ch.to(tl.int64) * shift_stride, mask=ch_mask, other=0).to(ACC)
    var = m2 / tl.maximum(count, 1)  # masked channels have count 0
    var_eps = tl.where(ch_mask, (var + eps_hi) + eps_lo, 1)
    return mean + shift, var, 1 / tl.sqrt(var_eps)


@triton.jit
def update_running(run_mean_ptr, run_var_ptr, mean, var, count, ch, ch_mask, momentum_hi, momentum_lo,
                   ACC: tl.constexpr):  # fmt: skip
    """``running <- (1 - m) * running + m * batch``, with the unbiased ``var * count / (count - 1)``.

    torch.nn's update, in place on the buffers (any float dtype), computed in ``ACC``; the
    momentum comes as two float32 parts like eps. One launch instead of four torch ops, whose
    host time (~10 us each on an H100 host) exceeded the kernels' on small layers.
    """
    m = tl.cast(momentum_hi, ACC) + tl.cast(momentum_lo, ACC)
    run_mean = tl.load(run_mean_ptr + ch, mask=ch_mask, other=0)
    run_var = tl.load(run_var_ptr + ch, mask=ch_mask, other=0)
    unbiased = var * count / tl.maximum(count - 1, 1)
    new_mean = run_mean.to(ACC) * (1 - m) + mean * m
    new_var = run_var.to(ACC) * (1 - m) + unbiased * m
    tl.store(run_mean_ptr + ch, new_mean.to(run_mean.dtype), mask=ch_mask)
    tl.store(run_var_ptr + ch, new_var.to(run_var.dtype), mask=ch_mask)


@triton.jit
def stats_combine_kernel(
    x_ptr, part_mean_ptr, part_m2_ptr, part_count_ptr, mean_ptr, var_ptr, invstd_ptr,
    C, K, shift_stride, eps_hi, eps_lo, run_mean_ptr, run_var_ptr, momentum_hi, momentum_lo,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
):  # fmt: skip
    """Merge the K partials of channels ``cb*BLOCK_C...`` into their mean, var and invstd (and
    update the running buffers with them when ``UPDATE_RUNNING``)."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    mean, m2, count = merge_partials(part_mean_ptr, part_m2_ptr, part_count_ptr, ch, ch_mask, K, BLOCK_K, ACC)
    mean, var, invstd = finish_stats(x_ptr, mean, m2, count, ch, ch_mask, shift_stride, eps_hi, eps_lo, ACC)
    if UPDATE_RUNNING:
        update_running(
            run_mean_ptr, run_var_ptr, mean, var, count, ch, ch_mask, momentum_hi, momentum_lo, ACC
        )
    tl.store(mean_ptr + ch, mean, mask=ch_mask)
    tl.store(var_ptr + ch, var, mask=ch_mask)
    tl.store(invstd_ptr + ch, invstd, mask=ch_mask)
