"""batchnorm.functional.batch_norm vs the reference (NumPy path) and torch.nn.functional (torch path)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from batchnorm import _custom_ops, reference
from batchnorm.functional import batch_norm

SHAPES = [(8, 3), (4, 3, 7), (2, 3, 4, 5), (2, 3, 3, 2, 4)]
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}
NP_TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-12)}


def _per_channel(rng, channels, dtype, affine=True):
    weight = rng.normal(size=channels).astype(dtype) if affine else None
    bias = rng.normal(size=channels).astype(dtype) if affine else None
    running_mean = rng.normal(size=channels).astype(dtype)
    running_var = rng.uniform(0.5, 2.0, size=channels).astype(dtype)
    return weight, bias, running_mean, running_var


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_numpy_matches_reference(shape, dtype, training, affine, rng):
    x = rng.normal(2.0, 3.0, size=shape).astype(dtype)
    weight, bias, running_mean, running_var = _per_channel(rng, shape[1], dtype, affine)
    rm0, rv0 = running_mean.copy(), running_var.copy()
    y = batch_norm(x, running_mean, running_var, weight, bias, training=training, momentum=0.3)
    x64 = x.astype(np.float64)
    w64 = None if weight is None else weight.astype(np.float64)
    b64 = None if bias is None else bias.astype(np.float64)
    if training:
        expected, cache = reference.forward(x64, w64, b64)
        count = x.size // shape[1]
        rm1, rv1 = reference.update_running(rm0, rv0, cache.mean, cache.var, count, 0.3)
        np.testing.assert_allclose(running_mean, rm1, **NP_TOL[dtype])
        np.testing.assert_allclose(running_var, rv1, **NP_TOL[dtype])
    else:
        expected = reference.forward_inference(x64, w64, b64, rm0, rv0)
        np.testing.assert_array_equal(running_mean, rm0)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, expected, **NP_TOL[dtype])


def test_numpy_path_does_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np\n"
        "from batchnorm.functional import batch_norm\n"
        "rm, rv = np.zeros(3), np.ones(3)\n"
        "y = batch_norm(np.random.rand(4, 3), rm, rv, training=True)\n"
        "assert y.shape == (4, 3) and rm.any()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "channels_last":
        fmt = torch.channels_last if t.ndim == 4 else torch.channels_last_3d
        return t.contiguous(memory_format=fmt)
    if layout == "non_contiguous":
        # every other element along the last axis: a strided view, not a copy
        return torch.cat([t, t], dim=-1)[..., ::2]
    return t


CASES = [(s, "contiguous") for s in SHAPES] + [
    (SHAPES[1], "non_contiguous"),
    (SHAPES[2], "non_contiguous"),
    (SHAPES[2], "channels_last"),
    (SHAPES[3], "channels_last"),
]


@pytest.mark.parametrize(("shape", "layout"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_torch_matches_torch_functional(shape, layout, dtype, training):
    gen = torch.Generator().manual_seed(0)
    channels = shape[1]
    x = _layout(torch.randn(shape, generator=gen, dtype=dtype) * 3 + 2, layout)
    dy = torch.randn(shape, generator=gen, dtype=dtype)
    weight = torch.randn(channels, generator=gen, dtype=dtype)
    bias = torch.randn(channels, generator=gen, dtype=dtype)
    rm = torch.randn(channels, generator=gen, dtype=dtype)
    rv = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    results = []
    for fn in (batch_norm, F.batch_norm):
        xi, wi, bi = (t.clone().requires_grad_() for t in (x, weight, bias))
        xi = _layout(xi.detach(), layout).requires_grad_()
        rmi, rvi = rm.clone(), rv.clone()
        y = fn(xi, rmi, rvi, wi, bi, training=training, momentum=0.2, eps=1e-5)
        y.backward(dy)
        results.append((y, xi.grad, wi.grad, bi.grad, rmi, rvi))
    ours, theirs = results
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, **TOL[dtype])
    assert ours[0].stride() == theirs[0].stride() == torch.empty_like(x).stride()


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(training, affine):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    params = (
        [torch.randn(2, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
        if affine
        else [None, None]
    )
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64) * 0.7

    def fn(x, *wb):
        w, b = wb if affine else (None, None)
        return batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)

    inputs = (x, *params) if affine else (x,)
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize(
    "op, args",
    [
        (_custom_ops.forward_train, "train"),
        (_custom_ops.forward_inference, "inference"),
    ],
)
def test_custom_ops_pass_opcheck(op, args):
    """Fake (meta) implementations agree with the real ones; autograd registration is sound."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 5, generator=gen, requires_grad=True)
    w, b = torch.randn(3, generator=gen, requires_grad=True), torch.randn(3, generator=gen)
    if args == "train":
        torch.library.opcheck(op, (x, w, b, 1e-5))
    else:
        torch.library.opcheck(
            op, (x, torch.randn(3, generator=gen), torch.rand(3, generator=gen) + 1, w, b, 1e-5)
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_with_float32_params(dtype, training):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 3, 5, 5, generator=gen) * 2 + 1).to(dtype).requires_grad_()
    weight, bias = torch.randn(3, generator=gen).requires_grad_(), torch.randn(3, generator=gen)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = batch_norm(x, rm, rv, weight, bias, training=training)
    y.float().sum().backward()
    assert y.dtype == dtype and weight.grad.dtype == torch.float32 and x.grad.dtype == dtype
    # exact math on the same (already rounded) values, then one rounding to the output dtype
    x64 = x.detach().double().numpy()
    w64, b64 = weight.detach().double().numpy(), bias.double().numpy()
    if training:
        expected, cache = reference.forward(x64, w64, b64)
        rm1, rv1 = reference.update_running(np.zeros(3), np.ones(3), cache.mean, cache.var, 100, 0.1)
        np.testing.assert_allclose(rm.numpy(), rm1, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(rv.numpy(), rv1, rtol=1e-5)
    else:
        expected = reference.forward_inference(x64, w64, b64, np.zeros(3), np.ones(3))
    resolution = 1e-3 if dtype == torch.float16 else 8e-3
    np.testing.assert_allclose(y.double().detach().numpy(), expected, rtol=resolution, atol=resolution)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("training", [True, False])
def test_empty_batch_returns_empty_and_keeps_stats(backend, training):
    x = np.zeros((0, 3, 4), np.float32)
    rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    if backend == "torch":
        x, rm, rv, w, b = (torch.from_numpy(a) for a in (x, rm, rv, w, b))
        x.requires_grad_()
        w.requires_grad_()
    y = batch_norm(x, rm, rv, w, b, training=training)
    assert tuple(y.shape) == (0, 3, 4)
    if backend == "torch":
        y.sum().backward()
        assert torch.equal(w.grad, torch.zeros(3))
        rm, rv = rm.numpy(), rv.numpy()
    np.testing.assert_array_equal(rm, np.full(3, 0.5))
    np.testing.assert_array_equal(rv, np.full(3, 2.0))


# (what to change, exception, fragment of the message)
BAD_INPUTS = {
    "integer input": (dict(x=np.ones((4, 3), np.int64)), TypeError, "input must be floating point"),
    "1-D input": (dict(x=np.ones(3, np.float32)), ValueError, "got 1-D with shape (3,)"),
    "wrong channels": (dict(x=np.ones((4, 5), np.float32)), ValueError, "weight must have shape (C,) = (5,)"),
    "dtype mismatch": (
        dict(weight=np.ones(3, np.float64)),
        TypeError,
        "weight has dtype float64 but input has float32",
    ),
    "one value per channel": (
        dict(x=np.ones((1, 3), np.float32)),
        ValueError,
        "Expected more than 1 value per channel when training",
    ),
    "eps zero": (dict(eps=0.0), ValueError, "eps must be > 0 in training"),
    "no running stats in eval": (
        dict(training=False, rm=None),
        ValueError,
        "running_mean and running_var are required",
    ),
    "momentum None": (dict(momentum=None), TypeError, "momentum=None"),
}


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_and_leaves_buffers(backend, case):
    change, error, fragment = BAD_INPUTS[case]
    args = dict(
        x=np.random.default_rng(0).normal(size=(4, 3)).astype(np.float32),
        rm=np.zeros(3, np.float32),
        rv=np.ones(3, np.float32),
        weight=np.ones(3, np.float32),
        training=True,
        momentum=0.1,
        eps=1e-5,
    )
    args.update(change)
    if backend == "torch":
        args = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in args.items()}
    rm, rv = args["rm"], args["rv"]
    before = [None if t is None else t.copy() if backend == "numpy" else t.clone() for t in (rm, rv)]
    with pytest.raises(error, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        batch_norm(args["x"], rm, rv, args["weight"], None, args["training"], args["momentum"], args["eps"])
    for t, t0 in zip((rm, rv), before, strict=True):
        if t is not None:
            np.testing.assert_array_equal(np.asarray(t), np.asarray(t0))


def test_mixed_numpy_and_torch_is_a_type_error():
    with pytest.raises(TypeError, match="pass all arrays as torch tensors or all as NumPy arrays"):
        batch_norm(torch.ones(4, 3), np.zeros(3, np.float32), np.ones(3, np.float32), training=False)


def test_device_mismatch_names_both_devices():
    with pytest.raises(ValueError, match="weight is on cpu but input is on meta"):
        batch_norm(torch.ones(4, 3, device="meta"), None, None, torch.ones(3), training=True)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("shape", [(256, 32), (16, 8, 7, 7)])
def test_training_gradients_keep_float32_accuracy_at_a_large_offset(shape, momentum):
    """The general eager path (functional calls, momentum=None modules) saves the float64 mean
    for the backward as the modules' fast path does: at mean 1e4, std 1e-2 a float32-rounded
    one put dweight off by ~5e-2 of its largest value."""
    import batchnorm.nn as bnn

    gen = torch.Generator().manual_seed(5)
    x = 1e4 + 1e-2 * torch.randn(*shape, generator=gen)
    dy = torch.randn(*shape, generator=gen)
    w = torch.rand(shape[1], generator=gen) + 0.5
    b = torch.randn(shape[1], generator=gen)
    results = []
    for dtype, fn in ((torch.float32, batch_norm), (torch.float64, F.batch_norm)):
        xi, wi, bi = (t.detach().to(dtype).requires_grad_() for t in (x, w, b))
        y = fn(xi, None, None, wi, bi, True, 0.1, 1e-5)
        y.backward(dy.to(dtype))
        results.append([t.detach().double() for t in (y, xi.grad, wi.grad, bi.grad)])
    module = (bnn.BatchNorm1d if len(shape) == 2 else bnn.BatchNorm2d)(shape[1], momentum=momentum)
    with torch.no_grad():
        module.weight.copy_(w)
        module.bias.copy_(b)
    xm = x.detach().clone().requires_grad_()
    module(xm).backward(dy)
    results.append([None, xm.grad.double(), None, None])
    for name, got, want, modular in zip(("y", "dx", "dweight", "dbias"), *results, strict=True):
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-6, f"{name}: {err:.2e} of its largest value"
        if modular is not None:
            assert float((modular - want).abs().max() / want.abs().max()) < 1e-6
