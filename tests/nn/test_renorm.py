"""BatchRenorm against a plain re-implementation of Ioffe (2017)'s equations, in torch autograd."""

from __future__ import annotations

import pytest
import torch

from batchnorm.nn import BatchRenorm1d, BatchRenorm2d
from batchnorm.nn.renorm import batch_renorm, renorm_limits

SHAPES = {BatchRenorm1d: [(16, 5), (8, 5, 7)], BatchRenorm2d: [(6, 5, 4, 3)]}
CASES = [(cls, shape) for cls, shapes in SHAPES.items() for shape in shapes]


def paper_renorm(x, gamma, beta, running_mean, running_var, eps, r_max, d_max):
    """Algorithm 1 of the paper, line by line; r and d are stop_gradient'ed."""
    axes = [0, *range(2, x.ndim)]
    view = (1, -1) + (1,) * (x.ndim - 2)
    mu_b = x.mean(axes)
    sigma_b = torch.sqrt(x.var(axes, unbiased=False) + eps)
    sigma = torch.sqrt(running_var + eps)
    r = (sigma_b / sigma).clamp(1 / r_max, r_max).detach()
    d = ((mu_b - running_mean) / sigma).clamp(-d_max, d_max).detach()
    x_hat = (x - mu_b.view(view)) / sigma_b.view(view)
    return gamma.view(view) * (x_hat * r.view(view) + d.view(view)) + beta.view(view)


def _stats(c, clipped):
    g = torch.Generator().manual_seed(1)
    # clipped: running stats far from the batch's, so r and d hit their limits on some channels
    scale = 4.0 if clipped else 0.2
    mean = torch.randn(c, generator=g, dtype=torch.float64) * scale
    var = torch.rand(c, generator=g, dtype=torch.float64) * (10.0 if clipped else 0.5) + 0.05
    return mean, var


@pytest.mark.parametrize("cls,shape", CASES)
@pytest.mark.parametrize("clipped", [False, True])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_matches_paper_forward_gradients_and_running_stats(cls, shape, clipped, affine, momentum):
    torch.manual_seed(0)
    c = shape[1]
    m = cls(c, affine=affine, momentum=momentum, r_max=2.0, d_max=0.5, warmup_steps=0).double()
    rm, rv = _stats(c, clipped)
    m.running_mean.copy_(rm)
    m.running_var.copy_(rv)
    if affine:
        with torch.no_grad():
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-1, 1)
    x = (torch.randn(shape, dtype=torch.float64) * 1.7 + 0.3).requires_grad_()
    upstream = torch.randn(shape, dtype=torch.float64)
    y = m(x)
    (y * upstream).sum().backward()

    gamma = (m.weight if affine else torch.ones(c, dtype=torch.float64)).detach().clone().requires_grad_()
    beta = (m.bias if affine else torch.zeros(c, dtype=torch.float64)).detach().clone().requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y2 = paper_renorm(x2, gamma, beta, rm, rv, m.eps, 2.0, 0.5)
    (y2 * upstream).sum().backward()

    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)
    if affine:
        torch.testing.assert_close(m.weight.grad, gamma.grad, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(m.bias.grad, beta.grad, rtol=1e-10, atol=1e-10)
    # running statistics: BatchNorm's update from this batch (after r, d used the old ones)
    factor = 1.0 if momentum is None else momentum
    axes = [0, *range(2, x.ndim)]
    torch.testing.assert_close(m.running_mean, (1 - factor) * rm + factor * x.detach().mean(axes))
    torch.testing.assert_close(
        m.running_var, (1 - factor) * rv + factor * x.detach().var(axes, unbiased=True)
    )
    assert int(m.renorm_step) == 1 and int(m.num_batches_tracked) == 1


def test_clipping_is_active_in_the_clipped_case():
    # guards the test above: with these statistics r and d must really be clipped somewhere
    rm, rv = _stats(5, True)
    x = torch.randn(16, 5, dtype=torch.float64) * 1.7 + 0.3
    r = torch.sqrt(x.var(0, unbiased=False) + 1e-5) / torch.sqrt(rv + 1e-5)
    d = (x.mean(0) - rm) / torch.sqrt(rv + 1e-5)
    assert bool(((r > 2.0) | (r < 0.5)).any()) and bool((d.abs() > 0.5).any())


def test_warmup_schedule_and_first_step_is_batchnorm():
    torch.manual_seed(0)
    m = BatchRenorm1d(4, r_max=3.0, d_max=5.0, warmup_steps=4).double()
    m.running_mean.fill_(3.0)  # would give a large d if the limits were open
    bn = torch.nn.BatchNorm1d(4).double()
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if k != "renorm_step"})
    x = torch.randn(8, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), bn(x), rtol=1e-12, atol=1e-12)  # r_max=1, d_max=0 at step 0
    seen = [m.limits()]
    for _ in range(5):
        m(torch.randn(8, 4, dtype=torch.float64))
        seen.append(m.limits())
    expected = [(1 + 2 * min(t / 4, 1), 5 * min(t / 4, 1)) for t in range(1, 7)]
    assert [v for pair in seen for v in pair] == pytest.approx([v for pair in expected for v in pair])
    assert renorm_limits(0, 3.0, 5.0, 0) == (3.0, 5.0)
    assert renorm_limits(10**6, 3.0, 5.0, 100) == (3.0, 5.0)


def test_state_dict_round_trip_and_batchnorm_checkpoint():
    m = BatchRenorm2d(3, warmup_steps=10)
    for _ in range(3):
        m(torch.randn(4, 3, 2, 2))
    state = m.state_dict()
    assert int(state["renorm_step"]) == 3
    fresh = BatchRenorm2d(3, warmup_steps=10)
    fresh.load_state_dict(state)
    assert int(fresh.renorm_step) == 3 and fresh.limits() == m.limits()
    torch.testing.assert_close(fresh.running_var, m.running_var)
    # a BatchNorm2d checkpoint has no renorm_step: it loads strictly, warm-up from 0
    bn_state = torch.nn.BatchNorm2d(3).state_dict()
    fresh.load_state_dict(bn_state)
    assert int(fresh.renorm_step) == 0


@pytest.mark.parametrize("cls,shape", CASES)
def test_eval_is_batchnorm(cls, shape):
    m = cls(shape[1]).double()
    m.running_mean.uniform_(-1, 1)
    m.running_var.uniform_(0.5, 2)
    ref = (
        torch.nn.BatchNorm1d(shape[1]).double()
        if cls is BatchRenorm1d
        else torch.nn.BatchNorm2d(shape[1]).double()
    )
    ref.load_state_dict({k: v for k, v in m.state_dict().items() if k != "renorm_step"})
    m.eval()
    ref.eval()
    x = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("limits", [(1.0, 0.0), (2.0, 0.5)])
def test_gradcheck(limits):
    # Numerical derivatives see r and d move with x unless they are pinned: r_max=1, d_max=0
    # (plain BN), or running statistics so far off that every r and d sits at its limit.
    # There the analytic gradient (r, d constant) is the true one and gradcheck is exact.
    torch.manual_seed(0)
    x = torch.randn(6, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    rm = torch.full((3,), 50.0, dtype=torch.float64)
    rv = torch.full((3,), 100.0, dtype=torch.float64)

    def f(x, w, b):
        # fresh buffers each call: the update must not leak into the numerical derivative
        return batch_renorm(x, rm.clone(), rv.clone(), w, b, r_max=limits[0], d_max=limits[1])

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_float32_and_channels_last():
    torch.manual_seed(0)
    m = BatchRenorm2d(4, warmup_steps=0)
    m.running_var.fill_(2.0)
    x = torch.randn(5, 4, 3, 3).to(memory_format=torch.channels_last)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    expected = paper_renorm(
        x.double(),
        m.weight.double(),
        m.bias.double(),
        torch.zeros(4, dtype=torch.float64),
        torch.full((4,), 2.0, dtype=torch.float64),
        1e-5,
        3.0,
        5.0,
    )
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"r_max": 0.5}, "r_max"), ({"d_max": -1.0}, "d_max"), ({"warmup_steps": -1}, "warmup_steps")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm1d(3, **kwargs)


def test_error_leaves_state_untouched():
    m = BatchRenorm1d(3)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="channels"):
        m(torch.randn(4, 5))
    with pytest.raises(ValueError, match="more than 1 value"):
        m(torch.randn(1, 3))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize(
    "cls,torch_cls", [(BatchRenorm1d, torch.nn.BatchNorm1d), (BatchRenorm2d, torch.nn.BatchNorm2d)]
)
def test_constructor_accepts_torch_keywords_and_bias_false(cls, torch_cls):
    import inspect

    kwargs = {k: p.default for k, p in inspect.signature(torch_cls).parameters.items() if k != "num_features"}
    assert "bias" in kwargs  # torch 2.13's keyword-only bias=
    cls(3, **kwargs)
    m = cls(3, bias=False, warmup_steps=0).double()
    expected = set(torch_cls(3, bias=False).state_dict()) | {"renorm_step"}
    assert m.bias is None and set(m.state_dict()) == expected
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        cls(3, track_running_stats=False)
    # bias=False equals bias=True with a zero bias, with clipping active (r, d from old stats)
    full = cls(3, warmup_steps=0).double()
    with torch.no_grad():
        full.bias.zero_()
        for mod in (m, full):
            mod.running_mean.fill_(0.5)
            mod.running_var.fill_(4.0)
    shape = (8, 3) if cls is BatchRenorm1d else (4, 3, 2, 2)
    x = torch.randn(shape, dtype=torch.float64) * 0.3 + 2
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    dy = torch.randn(shape, dtype=torch.float64)
    m(xa).backward(dy)
    full(xb).backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, full.weight.grad, rtol=1e-12, atol=1e-12)


def test_empty_spatial_extent_changes_nothing():
    """(N, C, 0, 0) holds no values: an empty output, statistics and counters untouched."""
    import batchnorm.nn as bnn

    module = bnn.BatchRenorm2d(3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    y = module(torch.randn(4, 3, 0, 0))
    assert y.shape == (4, 3, 0, 0)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert int(module.renorm_step) == 0


def test_output_and_gradients_keep_float32_accuracy_at_a_large_offset(float64_gaps):
    """mean 1e4, std 1e-2: y and the backward form x - mean from the float64 batch mean; a
    float32-rounded one put y off by ~1e-2 and dweight by ~5e-2 of their largest values."""
    gen = torch.Generator().manual_seed(2)
    x = 1e4 + 1e-2 * torch.randn(32, 16, 7, 7, generator=gen)
    dy = torch.randn(32, 16, 7, 7, generator=gen)
    gaps = float64_gaps(BatchRenorm2d(16), BatchRenorm2d(16).double(), x, dy)
    assert max(gaps.values()) < 1e-6, gaps
