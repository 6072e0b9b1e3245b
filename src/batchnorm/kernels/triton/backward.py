"""Triton kernels: the backward pass, a split reduction then one elementwise pass.

With ``z = gamma * x_hat + beta`` and ``dz = dy * act'(z)`` (``dz = dy`` without activation)::

    sum_dz      = sum_i dz_i                                   (= dbeta)
    sum_dz_xhat = sum_i dz_i * x_hat_i                         (= dgamma)
    dx_i = gamma * invstd * (dz_i - sum_dz / m - x_hat_i * sum_dz_xhat / m)

``backward_reduce_*`` write per-program partial sums (channel-major, ``c * K + k``, the tiling
of ``stats``), ``sums_combine_kernel`` adds the K partials, ``backward_dx_*`` applies the last
line. x and dy are each read twice (reduce, dx) and dx written once: the memory-traffic bound.

``FROM_OUTPUT``: ``v`` is the saved output y instead of x; then ``z = act^-1(y)`` and
``x_hat = (z - beta) / gamma`` (the dispatch checks act is invertible and gamma != 0).
``count`` (m) is an integer kernel argument divided in ``ACC``: a Python float ``1 / m`` would
reach the kernel as a float32 scalar, a 3e-8 relative error in float64 dx (seen on an H100).
Sums accumulate per lane in ``ACC`` (float32, float64 for float64 input); the lanes and the
partials are then added as trees, so rounding grows with log(m), not m.
"""

from __future__ import annotations

import triton
import triton.language as tl

from batchnorm.kernels.triton.act import activate_grad, pre_act


@triton.jit
def _dz_xhat(dy, v, mean, invstd, gamma, beta, slope, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr):
    """(dz, x_hat) of one tile from dy and the saved value v (x, or y when FROM_OUTPUT)."""
    if FROM_OUTPUT:
        z = pre_act(v, slope, ACT)
        x_hat = (z - beta) / gamma
    else:
        x_hat = (v - mean) * invstd
        z = x_hat * gamma + beta
    return dy * activate_grad(z, slope, ACT), x_hat


@triton.jit
def _channel_params(mean_ptr, invstd_ptr, weight_ptr, bias_ptr, ch, ch_mask, HAS_WEIGHT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, ACC: tl.constexpr):  # fmt: skip
    mean = tl.load(mean_ptr + ch, mask=ch_mask, other=0).to(ACC)
    invstd = tl.load(invstd_ptr + ch, mask=ch_mask, other=0).to(ACC)
    gamma = tl.full(ch.shape, 1, ACC)
    if HAS_WEIGHT:
        gamma = tl.load(weight_ptr + ch, mask=ch_mask, other=1).to(ACC)
    beta = tl.zeros(ch.shape, ACC)
    if HAS_BIAS:
        beta = tl.load(bias_ptr + ch, mask=ch_mask, other=0).to(ACC)
    return mean, invstd, gamma, beta


@triton.jit
def backward_reduce_ncs_kernel(
    dy_ptr, v_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope, part_dz_ptr, part_dz_xhat_ptr,
    N, C, S, tiles_per_prog,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_k = tl.num_programs(0) // C
    c = pid // num_k
    k = pid % num_k
    # Per-channel scalars, loaded as 1-element vectors so one helper serves both layouts.
    one = tl.arange(0, 1) + c
    mean, invstd, gamma, beta = _channel_params(
        mean_ptr, invstd_ptr, weight_ptr, bias_ptr, one, one < C, HAS_WEIGHT, HAS_BIAS, ACC
    )
    s_blocks = tl.cdiv(S, BLOCK_S)
    n_tiles = tl.cdiv(N, BLOCK_N) * s_blocks
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_S)
    acc_dz = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    acc_dz_xhat = tl.zeros([BLOCK_N, BLOCK_S], ACC)
    t_end = tl.minimum((k + 1) * tiles_per_prog, n_tiles)
    for t in range(k * tiles_per_prog, t_end):
        n = (t // s_blocks) * BLOCK_N + rows
        s = (t % s_blocks) * BLOCK_S + cols
        mask = (n < N)[:, None] & (s < S)[None, :]
        offs = (n.to(tl.int64) * C + c)[:, None] * S + s[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
        dz, x_hat = _dz_xhat(dy, v, mean[None, :], invstd[None, :], gamma[None, :], beta[None, :], slope,
                             ACT, FROM_OUTPUT)  # fmt: skip
        acc_dz += dz
        acc_dz_xhat += tl.where(mask, dz * x_hat, 0)
    tl.store(part_dz_ptr + pid, tl.sum(tl.sum(acc_dz, 1), 0))
    tl.store(part_dz_xhat_ptr + pid, tl.sum(tl.sum(acc_dz_xhat, 1), 0))


@triton.jit
def backward_reduce_rc_kernel(
    dy_ptr, v_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope, part_dz_ptr, part_dz_xhat_ptr,
    R, C, rows_per_prog,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    k = tl.program_id(1)
    num_k = tl.num_programs(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    mean, invstd, gamma, beta = _channel_params(
        mean_ptr, invstd_ptr, weight_ptr, bias_ptr, ch, ch_mask, HAS_WEIGHT, HAS_BIAS, ACC
    )
    rows = tl.arange(0, BLOCK_R)
    acc_dz = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    acc_dz_xhat = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    r_end = tl.minimum((k + 1) * rows_per_prog, R)
    for r0 in range(k * rows_per_prog, r_end, BLOCK_R):
        r = r0 + rows
        mask = (r < r_end)[:, None] & ch_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + ch[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
        dz, x_hat = _dz_xhat(dy, v, mean[None, :], invstd[None, :], gamma[None, :], beta[None, :], slope,
                             ACT, FROM_OUTPUT)  # fmt: skip
        acc_dz += dz
        acc_dz_xhat += tl.where(mask, dz * x_hat, 0)
    out = ch * num_k + k
    tl.store(part_dz_ptr + out, tl.sum(acc_dz, 0), mask=ch_mask)
    tl.store(part_dz_xhat_ptr + out, tl.sum(acc_dz_xhat, 0), mask=ch_mask)


@triton.jit
def sum_partials(part_a_ptr, part_b_ptr, ch, ch_mask, K, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """``sum_k part[c * K + k]`` of channels ``ch``, for both partial arrays."""
    sum_a = tl.zeros(ch.shape, ACC)
    sum_b = tl.zeros(ch.shape, ACC)
    ks = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        mask = ch_mask[:, None] & (k0 + ks < K)[None, :]
        offs = ch[:, None] * K + (k0 + ks)[None, :]
        sum_a += tl.sum(tl.load(part_a_ptr + offs, mask=mask, other=0), 1)
        sum_b += tl.sum(tl.load(part_b_ptr + offs, mask=mask, other=0), 1)
    return sum_a, sum_b


@triton.jit
def sums_combine_kernel(
    part_a_ptr, part_b_ptr, sum_a_ptr, sum_b_ptr, C, K,
    BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """sum_a[c] = sum_k part_a[c * K + k], the same for b."""
    ch = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    sum_a, sum_b = sum_partials(part_a_ptr, part_b_ptr, ch, ch_mask, K, BLOCK_K, ACC)
    tl.store(sum_a_ptr + ch, sum_a, mask=ch_mask)
    tl.store(sum_b_ptr + ch, sum_b, mask=ch_mask)


@triton.jit
def _channel_sums_or_given(
    sum_dz_ptr, sum_dz_xhat_ptr, part_dz_ptr, part_dz_xhat_ptr, ch, ch_mask, k, K,
    FROM_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """(sum_dz, sum_dz_xhat) of channels ``ch``: given, or added up from the K partials here (the
    whole backward: no separate combine launch), program k = 0 storing them."""
    if FROM_PARTIALS:
        sum_dz, sum_dz_xhat = sum_partials(part_dz_ptr, part_dz_xhat_ptr, ch, ch_mask, K, BLOCK_K, ACC)
        if k == 0:
            tl.store(sum_dz_ptr + ch, sum_dz, mask=ch_mask)
            tl.store(sum_dz_xhat_ptr + ch, sum_dz_xhat, mask=ch_mask)
    else:
        sum_dz = tl.load(sum_dz_ptr + ch, mask=ch_mask, other=0).to(ACC)
        sum_dz_xhat = tl.load(sum_dz_xhat_ptr + ch, mask=ch_mask, other=0).to(ACC)
    return sum_dz, sum_dz_xhat


@triton.jit
def backward_dx_ncs_kernel(
    dy_ptr, v_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope, sum_dz_ptr, sum_dz_xhat_ptr,
    count, N, C, S, tiles_per_prog, part_dz_ptr, part_dz_xhat_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, ACC: tl.constexpr,
    FROM_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_k = tl.num_programs(0) // C
    c = pid // num_k
    k = pid % num_k
    one = tl.arange(0, 1) + c
    mean, invstd, gamma, beta = _channel_params(
        mean_ptr, invstd_ptr, weight_ptr, bias_ptr, one, one < C, HAS_WEIGHT, HAS_BIAS, ACC
    )
    sum_dz, sum_dz_xhat = _channel_sums_or_given(
        sum_dz_ptr, sum_dz_xhat_ptr, part_dz_ptr, part_dz_xhat_ptr, one, one < C, k, num_k, FROM_PARTIALS,
        BLOCK_K, ACC,
    )  # fmt: skip
    mean_dz = (sum_dz / count)[None, :]
    mean_dz_xhat = (sum_dz_xhat / count)[None, :]
    k_dx = (gamma * invstd)[None, :]
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
        dy = tl.load(dy_ptr + offs, mask=mask, other=0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
        dz, x_hat = _dz_xhat(dy, v, mean[None, :], invstd[None, :], gamma[None, :], beta[None, :], slope,
                             ACT, FROM_OUTPUT)  # fmt: skip
        dx = k_dx * (dz - mean_dz - x_hat * mean_dz_xhat)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def backward_dx_rc_kernel(
    dy_ptr, v_ptr, dx_ptr, mean_ptr, invstd_ptr, weight_ptr, bias_ptr, slope, sum_dz_ptr, sum_dz_xhat_ptr,
    count, R, C, rows_per_prog, part_dz_ptr, part_dz_xhat_ptr,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, FROM_OUTPUT: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr,
    FROM_PARTIALS: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    cb = tl.program_id(0)
    k = tl.program_id(1)
    ch = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    ch_mask = ch < C
    mean, invstd, gamma, beta = _channel_params(
        mean_ptr, invstd_ptr, weight_ptr, bias_ptr, ch, ch_mask, HAS_WEIGHT, HAS_BIAS, ACC
    )
    sum_dz, sum_dz_xhat = _channel_sums_or_given(
        sum_dz_ptr, sum_dz_xhat_ptr, part_dz_ptr, part_dz_xhat_ptr, ch, ch_mask, k, tl.num_programs(1),
        FROM_PARTIALS, BLOCK_K, ACC,
    )  # fmt: skip
    mean_dz = (sum_dz / count)[None, :]
    mean_dz_xhat = (sum_dz_xhat / count)[None, :]
    k_dx = (gamma * invstd)[None, :]
    rows = tl.arange(0, BLOCK_R)
    r_end = tl.minimum((k + 1) * rows_per_prog, R)
    for r0 in range(k * rows_per_prog, r_end, BLOCK_R):
        r = r0 + rows
        mask = (r < r_end)[:, None] & ch_mask[None, :]
        offs = r.to(tl.int64)[:, None] * C + ch[None, :]
        dy = tl.load(dy_ptr + offs, mask=mask, other=0).to(ACC)
        v = tl.load(v_ptr + offs, mask=mask, other=0).to(ACC)
        dz, x_hat = _dz_xhat(dy, v, mean[None, :], invstd[None, :], gamma[None, :], beta[None, :], slope,
                             ACT, FROM_OUTPUT)  # fmt: skip
        dx = k_dx * (dz - mean_dz - x_hat * mean_dz_xhat)
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
