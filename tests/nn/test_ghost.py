"""GhostBatchNorm against normalizing each chunk by hand with the NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm import reference
from batchnorm.nn import GhostBatchNorm1d, GhostBatchNorm2d
from batchnorm.nn.ghost import ghost_batch_norm

CASES = [
    (GhostBatchNorm1d, (12, 4), 4),  # even chunks
    (GhostBatchNorm1d, (11, 4), 4),  # last chunk smaller
    (GhostBatchNorm1d, (10, 4, 6), 3),  # (N, C, L); last chunk of 1 sample, 6 values
    (GhostBatchNorm2d, (9, 3, 4, 5), 4),
    (GhostBatchNorm2d, (5, 3, 2, 2), 8),  # one chunk: plain BN
]
# (case, channels_last): the 4-D cases run in both memory formats
GRID = [(*case, False) for case in CASES] + [(*case, True) for case in CASES if len(case[1]) == 4]


def by_hand(x, dy, gamma, beta, v, running_mean, running_var, momentum, eps=1e-5):
    """Each chunk through reference.forward/backward; running stats pooled as documented."""
    ys, dxs, dgamma, dbeta, m2, counts, means = [], [], 0.0, 0.0, 0.0, [], []
    for start in range(0, x.shape[0], v):
        xc, dyc = x[start : start + v], dy[start : start + v]
        y, cache = reference.forward(xc, gamma, beta, eps)
        dx, dg, db = reference.backward(dyc, cache)
        ys.append(y)
        dxs.append(dx)
        dgamma, dbeta = dgamma + dg, dbeta + db
        n = xc.size // xc.shape[1]
        counts.append(n)
        means.append(cache.mean)
        m2 = m2 + cache.var * n
    n, k = sum(counts), len(counts)
    mean = sum(c * mu for c, mu in zip(counts, means, strict=True)) / n
    var_u = m2 / (n - k)
    new_rm = (1 - momentum) * running_mean + momentum * mean
    new_rv = (1 - momentum) * running_var + momentum * var_u
    return np.concatenate(ys), np.concatenate(dxs), dgamma, dbeta, new_rm, new_rv


@pytest.mark.parametrize("cls,shape,v,channels_last", GRID)
def test_matches_chunks_by_hand(cls, shape, v, channels_last):
    rng = np.random.default_rng(0)
    c = shape[1]
    m = cls(c, virtual_batch_size=v).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
        m.running_mean.uniform_(-1, 1)
        m.running_var.uniform_(0.5, 2)
    rm0, rv0 = m.running_mean.numpy().copy(), m.running_var.numpy().copy()
    x_np = rng.normal(2.0, 3.0, shape)
    dy_np = rng.normal(size=shape)
    x = torch.from_numpy(x_np.copy())
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    x.requires_grad_()
    y = m(x)
    y.backward(torch.from_numpy(dy_np))
    ey, edx, edg, edb, erm, erv = by_hand(
        x_np, dy_np, m.weight.detach().numpy(), m.bias.detach().numpy(), v, rm0, rv0, 0.1
    )
    np.testing.assert_allclose(y.detach().numpy(), ey, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(x.grad.numpy(), edx, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(m.weight.grad.numpy(), edg, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(m.bias.grad.numpy(), edb, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(m.running_mean.numpy(), erm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.running_var.numpy(), erv, rtol=1e-12, atol=1e-12)
    assert int(m.num_batches_tracked) == 1
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_one_chunk_is_torch_batchnorm(momentum):
    torch.manual_seed(0)
    m = GhostBatchNorm2d(3, virtual_batch_size=64, momentum=momentum)
    ref = torch.nn.BatchNorm2d(3, momentum=momentum)
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4) * 2 + 1
        torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    m.eval()
    ref.eval()
    x = torch.randn(8, 3, 4, 4)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-5, atol=1e-5)


def test_eval_is_batchnorm_with_many_chunks():
    m = GhostBatchNorm1d(4, virtual_batch_size=2).double()
    m(torch.randn(10, 4, dtype=torch.float64) * 3)
    ref = torch.nn.BatchNorm1d(4).double()
    ref.load_state_dict(m.state_dict())
    m.eval()
    ref.eval()
    x = torch.randn(10, 4, dtype=torch.float64)
    torch.testing.assert_close(m(x), ref(x), rtol=1e-12, atol=1e-12)


def test_gradcheck():
    torch.manual_seed(0)
    x = torch.randn(7, 3, 2, 2, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: ghost_batch_norm(x, None, None, w, b, 3), (x, w, b))


def test_float32_close_to_float64():
    m32 = GhostBatchNorm2d(3, virtual_batch_size=3)
    m64 = GhostBatchNorm2d(3, virtual_batch_size=3).double()
    x = torch.randn(8, 3, 5, 5) * 4 + 10
    torch.testing.assert_close(m32(x).double(), m64(x.double()), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m32.running_var.double(), m64.running_var, rtol=1e-5, atol=1e-6)


def test_repr_and_errors():
    assert "virtual_batch_size=4" in repr(GhostBatchNorm1d(3, virtual_batch_size=4))
    with pytest.raises(ValueError, match="virtual_batch_size"):
        GhostBatchNorm1d(3, virtual_batch_size=0)
    m = GhostBatchNorm1d(3, virtual_batch_size=4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="1 value per channel"):
        m(torch.randn(9, 3))  # last chunk of one (N, C) sample
    with pytest.raises(ValueError, match="got 4-D"):
        m(torch.randn(8, 3, 2, 2))
    for k, v in m.state_dict().items():
        assert torch.equal(v, before[k]), k


def torch_keywords(torch_cls) -> dict:
    """Every keyword torch's constructor accepts, at its default value."""
    import inspect

    params = inspect.signature(torch_cls).parameters
    return {name: p.default for name, p in params.items() if name != "num_features"}


@pytest.mark.parametrize(
    "cls,torch_cls,shape",
    [
        (GhostBatchNorm1d, torch.nn.BatchNorm1d, (8, 3, 5)),
        (GhostBatchNorm2d, torch.nn.BatchNorm2d, (8, 3, 2, 2)),
    ],
)
def test_constructor_accepts_torch_keywords_and_bias_false(cls, torch_cls, shape):
    kwargs = torch_keywords(torch_cls)
    assert "bias" in kwargs  # torch 2.13's keyword-only bias=
    cls(3, virtual_batch_size=4, **kwargs)
    m = cls(3, virtual_batch_size=4, bias=False).double()
    assert m.bias is None and set(m.state_dict()) == set(torch_cls(3, bias=False).state_dict())
    # bias=False equals bias=True with a zero bias, gradients included
    full = cls(3, virtual_batch_size=4).double()
    with torch.no_grad():
        full.weight.copy_(torch.linspace(0.5, 1.5, 3))
        m.weight.copy_(full.weight)
        full.bias.zero_()
    x = torch.randn(shape, dtype=torch.float64) * 2 + 1
    dy = torch.randn(shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    m(xa).backward(dy)
    full(xb).backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.weight.grad, full.weight.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m.running_var, full.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_chunks_write_into_the_output_without_a_copy(monkeypatch, dtype):
    """CPU float32/64 chunks run the kernels with out= on slices of the output: the
    allocate-then-copy path (_torch_ops) is not used."""
    from batchnorm import _torch_ops

    def forbidden(*args, **kwargs):
        raise AssertionError("the per-chunk copy path was taken")

    monkeypatch.setattr(_torch_ops, "forward_train", forbidden)
    monkeypatch.setattr(_torch_ops, "backward", forbidden)
    m = GhostBatchNorm2d(3, virtual_batch_size=3).to(dtype)
    x = (torch.randn(7, 3, 2, 2, dtype=dtype) * 2 + 1).to(memory_format=torch.channels_last).requires_grad_()
    y = m(x)
    y.backward(torch.ones_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    chunk = x.detach()[:3]
    torch.testing.assert_close(
        y[:3], torch.nn.functional.batch_norm(chunk, None, None, m.weight, m.bias, True), rtol=1e-5, atol=1e-5
    )


def test_empty_spatial_extent_changes_nothing():
    """(N, C, 0, 0) holds no values: an empty output, statistics and counters untouched."""
    import batchnorm.nn as bnn

    module = bnn.GhostBatchNorm2d(3, virtual_batch_size=2)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    y = module(torch.randn(4, 3, 0, 0))
    assert y.shape == (4, 3, 0, 0)
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gradients_keep_float32_accuracy_at_a_large_offset(layout, float64_gaps):
    """mean 1e4, std 1e-2: each chunk's backward forms x_hat from its float64 mean (a
    float32-rounded one put dweight off by ~4e-2 of its largest value)."""
    gen = torch.Generator().manual_seed(2)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = (1e4 + 1e-2 * torch.randn(32, 16, 7, 7, generator=gen)).contiguous(memory_format=fmt)
    dy = torch.randn(32, 16, 7, 7, generator=gen).contiguous(memory_format=fmt)
    make = lambda: GhostBatchNorm2d(16, virtual_batch_size=8)  # noqa: E731
    gaps = float64_gaps(make(), make().double(), x, dy)
    assert max(gaps.values()) < 1e-6, gaps
