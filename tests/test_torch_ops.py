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
