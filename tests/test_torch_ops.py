"""The tensor-level dispatch: non-finite values behave as in torch.nn (propagate, no warning), and
CUDA tensors go to the kernel measured faster for their shape."""

from __future__ import annotations

import pytest
import torch

import batchnorm.nn as bnn


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
@pytest.mark.parametrize("training", [True, False])
def test_non_finite_input_propagates_silently_like_torch(bad, training):
    x = torch.randn(8, 3, 4, 4)
    x[0, 1, 0, 0] = bad
    ours, theirs = bnn.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours.train(training), theirs.train(training)
    # filterwarnings=error turns any NumPy RuntimeWarning into a failure here.
    y_ours, y_theirs = ours(x), theirs(x)
    assert torch.equal(torch.isfinite(y_ours), torch.isfinite(y_theirs))
    finite = torch.isfinite(y_theirs)
    torch.testing.assert_close(y_ours[finite], y_theirs[finite], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("shape", "channels_last", "backend", "uses_torch"),
    [
        ((64, 64, 112, 112), False, None, False),  # 802k values a channel: Triton measured faster
        ((256, 3, 224, 224), False, None, False),
        ((64, 64, 56, 56), False, None, True),  # 200k: torch's was faster
        ((64, 64, 112, 112), True, None, True),  # channels-last: torch's was faster
        ((8192, 1024), False, None, True),  # (N, C)
        ((64, 512, 7, 7), False, "triton", False),
        ((256, 3, 224, 224), False, "torch", True),
    ],
)
def test_cuda_route_picks_the_kernel_measured_faster(shape, channels_last, backend, uses_torch, monkeypatch):
    from batchnorm import _torch_ops

    if backend is None:
        monkeypatch.delenv("BATCHNORM_BACKEND", raising=False)
    else:
        monkeypatch.setenv("BATCHNORM_BACKEND", backend)
    x = torch.empty(shape, device="meta")  # the decision reads only the shape and the strides
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    assert _torch_ops.cuda_uses_torch(x) is uses_torch


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("module", ["bn", "bn_act"])
def test_torch_route_gives_torch_nn_results(module, training, monkeypatch):
    """The route to torch's own kernel (taken on CUDA where it is faster), forced here on CPU
    tensors: outputs, gradients and running statistics are torch.nn's, activation included."""
    from batchnorm import _torch_ops
    from batchnorm.nn import BatchNormAct2d
    from batchnorm.nn.batchnorm import BatchNormBase

    routed: list[int] = []
    monkeypatch.setattr(_torch_ops, "torch_kernel_route", lambda x: routed.append(1) or True)
    # the CPU fast path never asks for a route: the general path is the one CUDA tensors take
    monkeypatch.setattr(BatchNormBase, "_forward_fast", lambda self, x: None)
    torch.manual_seed(0)
    ours = bnn.BatchNorm2d(4) if module == "bn" else BatchNormAct2d(4, act="leaky_relu", negative_slope=0.2)
    ref = torch.nn.BatchNorm2d(4)
    ours.train(training)
    ref.train(training)
    post = (lambda v: v) if module == "bn" else (lambda v: torch.nn.functional.leaky_relu(v, 0.2))
    for step in range(3):
        x = (torch.randn(3, 4, 5, 5) * 2 + step).requires_grad_()
        x_ref = x.detach().clone().requires_grad_()
        y, y_ref = ours(x), post(ref(x_ref))
        dy = torch.randn_like(y)
        y.backward(dy)
        y_ref.backward(dy)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(x.grad, x_ref.grad)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad)
        ours.zero_grad()
        ref.zero_grad()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name))
    # (a BatchNormAct eval call that records a graph runs torch's batch_norm whatever the route)
    assert len(routed) == (0 if module == "bn_act" and not training else 3)
