"""The Triton kernels against the NumPy reference (float64 math).

Without a GPU the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set below before the kernels are imported); with one, the same tests run natively on CUDA.
The interpreter is slow, so shapes are tiny; ``SPLIT`` launch configs force several programs
per channel (and per channel block) with a remainder, the code path large inputs take on a GPU.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from batchnorm import reference as ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from batchnorm.kernels import triton as tk  # noqa: E402

if DEVICE == "cpu" and not tk.INTERPRETED:
    pytest.skip("batchnorm.kernels.triton was imported before TRITON_INTERPRET=1", allow_module_level=True)

EPS = 1e-5
# (rtol, atol) of outputs against the float64 reference, by input dtype: a few ulps of the dtype.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 4e-3),
    torch.bfloat16: (1.6e-2, 3e-2),
}
DTYPES = list(TOL)
# Statistics are float32 for every input but float64, so their tolerance is float32's.
STAT_TOL = {dt: TOL[torch.float64] if dt == torch.float64 else TOL[torch.float32] for dt in DTYPES}

# layout name -> shape; the tensor is built by `make`
LAYOUTS = {
    "nchw": (3, 4, 5, 6),
    "nhwc": (3, 4, 5, 6),  # channels-last
    "nc": (10, 5),
    "ncl": (3, 4, 7),
    "nlc": (3, 4, 7),  # (N, C, L) with channels innermost
}
# Tiny tiles and many programs per "SM": several programs per channel, the last one short.
SPLIT = tk.LaunchConfig(tile_bytes=64, programs_per_sm=8, max_block_c=4, sm_count=1)


def make(
    layout: str, dtype: torch.dtype, seed: int = 0, loc: float = 0.5, scale: float = 2.0
) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = LAYOUTS[layout]
    x = torch.randn(shape, generator=g, dtype=torch.float64) * scale + loc
    if layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "nlc":
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x.to(dtype).to(DEVICE)


def params(c: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(c, generator=g) + 0.5).to(DEVICE), torch.randn(c, generator=g).to(DEVICE)


def np64(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().double().numpy()


def close(actual: torch.Tensor, expected: np.ndarray, tol: tuple[float, float]) -> None:
    np.testing.assert_allclose(np64(actual), expected, rtol=tol[0], atol=tol[1])


@pytest.mark.parametrize("config", [None, SPLIT], ids=["default", "split"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_backward_match_reference(dtype, layout, config):
    x = make(layout, dtype)
    weight, bias = params(x.shape[1])
    y, mean, var, invstd = tk.forward_train(x, weight, bias, EPS, config=config)
    y_ref, cache = ref.forward(np64(x), np64(weight), np64(bias), EPS)
    assert y.dtype == x.dtype and y.stride() == x.stride()
    assert (
        mean.dtype
        == var.dtype
        == invstd.dtype
        == (torch.float64 if dtype == torch.float64 else torch.float32)
    )
    close(y, y_ref, TOL[dtype])
    close(mean, cache.mean, STAT_TOL[dtype])
    close(var, cache.var, STAT_TOL[dtype])
    close(invstd, cache.invstd, STAT_TOL[dtype])

    dy = make(layout, dtype, seed=2, loc=0.0, scale=1.0)
    dx, dweight, dbias = tk.backward(dy, x, mean, invstd, weight, config=config)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(np64(dy), cache)
    assert dx.dtype == x.dtype and dx.stride() == x.stride()
    close(dx, dx_ref, TOL[dtype])
    # Sums over m values: float32 rounding grows like sqrt(m) * ulp, m <= 210 here.
    close(dweight, dgamma_ref, (STAT_TOL[dtype][0], 10 * STAT_TOL[dtype][1]))
    close(dbias, dbeta_ref, (STAT_TOL[dtype][0], 10 * STAT_TOL[dtype][1]))


@pytest.mark.parametrize("merged", [True, False], ids=["in-normalize", "in-combine"])
@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_running_buffers_update_inside_the_kernels(dtype, layout, merged, monkeypatch):
    """``running=`` updates the buffers as torch.nn does, whether the normalize pass merges the
    statistics (and updates) or the separate combine launch does."""
    from batchnorm.kernels.triton import _dispatch

    if not merged:
        monkeypatch.setattr(_dispatch, "_MERGE_WORK_LIMIT", 0)
    x = make(layout, dtype, seed=7)
    c = x.shape[1]
    run_mean = torch.linspace(-1, 1, c, dtype=dtype, device=x.device)
    run_var = torch.linspace(0.5, 2, c, dtype=dtype, device=x.device)
    start_mean, start_var = np64(run_mean).copy(), np64(run_var).copy()  # np64 may share memory
    y, mean, var, _ = tk.forward_train(x, None, None, EPS, running=(run_mean, run_var, 0.3), config=SPLIT)
    _, cache = ref.forward(np64(x), None, None, EPS)
    expected = ref.update_running(start_mean, start_var, cache.mean, cache.var, x.numel() // c, 0.3)
    close(run_mean, expected[0], STAT_TOL[dtype])
    close(run_var, expected[1], STAT_TOL[dtype])
    close(y, cache.x_hat, TOL[dtype])


def test_running_buffers_must_be_dense():
    x = make("nchw", torch.float32)
    run_mean = torch.zeros(2 * x.shape[1], device=x.device)[::2]
    with pytest.raises(ValueError, match="running_mean: expected a contiguous buffer"):
        tk.forward_train(x, None, None, EPS, running=(run_mean, torch.ones(x.shape[1], device=x.device), 0.1))


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_separate_combine_launches_equal_the_merging_passes(layout, monkeypatch):
    """Above ``_MERGE_WORK_LIMIT`` the statistics and the sums get their own combine launch
    instead of being merged inside the normalize and dx programs: same results."""
    from batchnorm.kernels.triton import _dispatch

    x = make(layout, torch.float32)
    dy = make(layout, torch.float32, seed=2, loc=0.0, scale=1.0)
    weight, bias = params(x.shape[1])
    merged = tk.forward_train(x, weight, bias, EPS, config=SPLIT)
    merged_bwd = tk.backward(dy, x, merged[1], merged[3], weight, config=SPLIT)
    monkeypatch.setattr(_dispatch, "_MERGE_WORK_LIMIT", 0)
    separate = tk.forward_train(x, weight, bias, EPS, config=SPLIT)
    separate_bwd = tk.backward(dy, x, separate[1], separate[3], weight, config=SPLIT)
    for a, b in zip((*merged, *merged_bwd), (*separate, *separate_bwd), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_pieces_compose_like_the_whole(layout):
    """channel_stats, normalize, backward_reduce and backward_dx, without weight and bias."""
    x = make(layout, torch.float32)
    y_ref, cache = ref.forward(np64(x), None, None, EPS)
    mean, var = tk.channel_stats(x, config=SPLIT)
    close(mean, cache.mean, TOL[torch.float32])
    close(var, cache.var, TOL[torch.float32])
    invstd = torch.rsqrt(var + EPS)
    close(tk.normalize(x, mean, invstd, None, None), y_ref, TOL[torch.float32])

    dy = make(layout, torch.float32, seed=3, loc=0.0, scale=1.0)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(np64(dy), cache)
    sum_dy, sum_dy_xhat = tk.backward_reduce(dy, x, mean, invstd, config=SPLIT)
    close(sum_dy, dbeta_ref, (1e-5, 1e-4))
    close(sum_dy_xhat, dgamma_ref, (1e-5, 1e-4))
    count = x.numel() // x.shape[1]
    close(tk.backward_dx(dy, x, mean, invstd, None, sum_dy, sum_dy_xhat, count), dx_ref, TOL[torch.float32])


def test_backward_dx_takes_the_count_of_an_all_reduced_sum():
    """SyncBatchNorm: sums over the whole group, count = all values of the group per channel."""
    x = make("nchw", torch.float64)
    dy = make("nchw", torch.float64, seed=4)
    weight, _ = params(x.shape[1])
    mean, var = (torch.rand(x.shape[1], dtype=torch.float64, device=x.device) for _ in range(2))
    invstd = torch.rsqrt(var + EPS)
    sum_dy, sum_dy_xhat = (torch.randn(x.shape[1], device=x.device) for _ in range(2))
    count = 1000
    dx = tk.backward_dx(dy, x, mean, invstd, weight.double(), sum_dy.double(), sum_dy_xhat.double(), count)
    c = lambda v: np64(v).reshape(1, -1, 1, 1)  # noqa: E731
    x_hat = (np64(x) - c(mean)) * c(invstd)
    expected = c(weight) * c(invstd) * (np64(dy) - c(sum_dy) / count - x_hat * c(sum_dy_xhat) / count)
    close(dx, expected, TOL[torch.float64])


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_matches_torch_autograd(layout):
    x = make(layout, torch.float32).requires_grad_()
    weight, bias = (p.requires_grad_() for p in params(x.shape[1]))
    y_t = torch.nn.functional.batch_norm(x, None, None, weight, bias, training=True, eps=EPS)
    dy = make(layout, torch.float32, seed=5)
    dx_t, dw_t, db_t = torch.autograd.grad(y_t, (x, weight, bias), dy)
    y, mean, _, invstd = tk.forward_train(x.detach(), weight.detach(), bias.detach(), EPS)
    dx, dw, db = tk.backward(dy, x.detach(), mean, invstd, weight.detach())
    for ours, theirs in ((y, y_t), (dx, dx_t), (dw, dw_t), (db, db_t)):
        torch.testing.assert_close(ours, theirs.detach(), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_constant_channel_has_zero_variance_and_finite_gradient(layout):
    x = make(layout, torch.float32)
    x[:, 1] = 3.7
    weight, bias = params(x.shape[1])
    y, mean, var, invstd = tk.forward_train(x, weight, bias, EPS, config=SPLIT)
    assert var[1].item() == 0.0  # the Welford shift makes every value of the channel 0
    assert mean[1].item() == pytest.approx(3.7, rel=1e-7)
    torch.testing.assert_close(y[:, 1], torch.full_like(y[:, 1], bias[1].item()))
    dx, _, _ = tk.backward(make(layout, torch.float32, seed=6), x, mean, invstd, weight, config=SPLIT)
    assert torch.isfinite(dx).all()


@pytest.mark.parametrize("layout", ["nchw", "nhwc", "nc"])
def test_large_offset_keeps_float32_precision(layout):
    """mean 1e4, std 1e-2 in float32: E[x^2] - E[x]^2 or an unshifted float32 Welford fail here."""
    x = make(layout, torch.float32, loc=1e4, scale=1e-2)
    weight, bias = params(x.shape[1])
    y, mean, var, invstd = tk.forward_train(x, weight, bias, EPS, config=SPLIT)
    _, cache = ref.forward(np64(x), None, None, EPS)
    close(var, cache.var, (1e-4, 0))
    close(mean, cache.mean, (0, np.spacing(np.float32(1e4))))  # the float32 rounding of the mean
    # y from the float32 statistics the kernel returned, in float64: checks the normalize pass
    # itself (x * scale + shift would be off by ~0.06 here).
    c = lambda v: np64(v).reshape((1, -1) + (1,) * (x.dim() - 2))  # noqa: E731
    expected = (np64(x) - c(mean)) * c(invstd) * c(weight) + c(bias)
    close(y, expected, (1e-5, 1e-4))


ACTS = {
    "identity": (lambda z: z, lambda z: np.ones_like(z)),
    "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
    "leaky_relu": (lambda z: np.where(z > 0, z, 0.1 * z), lambda z: np.where(z > 0, 1.0, 0.1)),
    "silu": (
        lambda z: z / (1 + np.exp(-z)),
        lambda z: (s := 1 / (1 + np.exp(-z))) * (1 + z * (1 - s)),
    ),
}


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("act", list(ACTS))
def test_fused_activation_matches_reference(act, layout):
    f, f_grad = ACTS[act]
    x = make(layout, torch.float32)
    weight, bias = params(x.shape[1])
    y, mean, var, invstd = tk.forward_train_act(x, weight, bias, EPS, act, 0.1, config=SPLIT)
    z_ref, cache = ref.forward(np64(x), np64(weight), np64(bias), EPS)
    close(y, f(z_ref), TOL[torch.float32])

    dy = make(layout, torch.float32, seed=7)
    dz_ref = np64(dy) * f_grad(z_ref)
    dx_ref, dgamma_ref, dbeta_ref = ref.backward(dz_ref, cache)
    saved_options = [(x, False)] + ([(y, True)] if act in ("identity", "leaky_relu") else [])
    for saved, from_output in saved_options:
        dx, dweight, dbias = tk.backward_act(
            dy, saved, mean, invstd, weight, bias, act, 0.1, from_output, config=SPLIT
        )
        close(dx, dx_ref, (1e-4, 1e-4) if from_output else TOL[torch.float32])
        close(dweight, dgamma_ref, (1e-4, 1e-4))
        close(dbias, dbeta_ref, (1e-4, 1e-4))
    close(tk.normalize_act(x, mean, invstd, weight, bias, act, 0.1), f(z_ref), TOL[torch.float32])


def test_forward_inference_act_uses_running_statistics():
    x = make("nhwc", torch.float32)
    weight, bias = params(x.shape[1])
    running_mean, running_var = torch.randn(x.shape[1]).to(DEVICE), (torch.rand(x.shape[1]) + 0.5).to(DEVICE)
    y = tk.forward_inference_act(x, weight, bias, running_mean, running_var, EPS, "leaky_relu", 0.1)
    z = ref.forward_inference(np64(x), *(np64(t) for t in (weight, bias, running_mean, running_var)), EPS)
    close(y, ACTS["leaky_relu"][0](z), TOL[torch.float32])


def test_autotune_never_runs_in_the_interpreter(monkeypatch):
    from batchnorm.kernels.triton import _tune

    monkeypatch.setenv("BATCHNORM_TRITON_AUTOTUNE", "1")
    assert _tune.enabled(torch.empty(1)) is False  # CPU tensor: the interpreter, no timing
    assert len(_tune.CANDIDATES) == 9


def test_import_batchnorm_needs_no_triton():
    import subprocess
    import sys

    code = "import sys, batchnorm, batchnorm.kernels; assert 'triton' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_dy_in_another_layout_and_non_dense_x():
    x = make("nchw", torch.float32)[:, :, ::2]  # non-dense: copied to contiguous first
    weight, bias = params(x.shape[1])
    y, mean, _, invstd = tk.forward_train(x, weight, bias, EPS)
    y_ref, cache = ref.forward(np64(x), np64(weight), np64(bias), EPS)
    close(y, y_ref, TOL[torch.float32])
    dy = make("nchw", torch.float32, seed=8)[:, :, ::2].contiguous(memory_format=torch.channels_last)
    dx, _, _ = tk.backward(dy, x, mean, invstd, weight)
    close(dx, ref.backward(np64(dy), cache)[0], TOL[torch.float32])


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x, w: tk.forward_train(x.int(), w, w, EPS), TypeError, "x: expected float16"),
        (lambda x, w: tk.forward_train(x[0, 0, 0], w, w, EPS), ValueError, "x: expected shape"),
        (lambda x, w: tk.forward_train(x[:0], w, w, EPS), ValueError, "at least one value"),
        (lambda x, w: tk.forward_train(x, w[:2], w, EPS), ValueError, "weight: expected shape"),
        (lambda x, w: tk.forward_train(x, w, w, -1.0), ValueError, "eps"),
        (lambda x, w: tk.forward_train_act(x, w, w, EPS, "gelu"), ValueError, "act: expected one of"),
        (lambda x, w: tk.backward(x[:1], x, w, w, w), ValueError, "dy: expected shape"),
        (lambda x, w: tk.backward_act(x, x, w, w, w, w, "relu", 0.0, True), ValueError, "from_output"),
        (lambda x, w: tk.backward_dx(x, x, w, w, w, w, w, 0), ValueError, "count"),
    ],
)
def test_errors_name_the_argument(call, error, match):
    x = make("nchw", torch.float32)
    weight, _ = params(x.shape[1])
    with pytest.raises(error, match=match):
        call(x, weight)


def test_plan_splits_few_channels_over_many_programs():
    """The block-size heuristic, on the issue's shapes for a 132-SM GPU (no kernel runs)."""
    h100 = tk.LaunchConfig(sm_count=132)
    cpu = torch.device("cpu")
    view = tk._dispatch._View  # noqa: SLF001 - the plan's input, built here without a tensor

    first_layer = tk.plan(view(torch.empty(0), "ncs", 256, 3, 224 * 224), 4, h100, cpu)
    assert first_layer.grid[0] >= 0.9 * 8 * 132 and first_layer.split > 100
    deep = tk.plan(view(torch.empty(0), "ncs", 64, 2048, 49), 4, h100, cpu)
    assert (deep.block_a, deep.block_b, deep.split) == (32, 64, 1)  # 7x7 padded to 64, 32 images a tile
    fc = tk.plan(view(torch.empty(0), "rc", 8192, 1024, 1), 4, h100, cpu)
    assert fc.block_b == 128 and fc.grid[0] * fc.grid[1] >= 0.9 * 8 * 132
    assert fc.per_prog % fc.block_a == 0  # whole row tiles per program
    half = tk.plan(view(torch.empty(0), "ncs", 256, 3, 224 * 224), 2, h100, cpu)
    assert half.block_a * half.block_b == 2 * first_layer.block_a * first_layer.block_b  # 8 KiB tiles


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_torch_ops_route_cuda_tensors_here():
    from batchnorm import _torch_ops

    x = make("nchw", torch.float32)
    weight, bias = params(x.shape[1])
    y, *_ = _torch_ops.forward_train(x, weight, bias, EPS)
    torch.testing.assert_close(y, tk.forward_train(x, weight, bias, EPS)[0])
