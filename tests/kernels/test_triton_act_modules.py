"""BatchNormAct on the Triton code path, through the interpreter (BATCHNORM_BACKEND=triton).

The kernel tests check the Triton act functions one by one; this checks that the module routes
there (spied calls) and that its output, autograd and running statistics equal torch.nn's
BatchNorm followed by the activation. Kept small: the interpreter is slow.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import batchnorm.nn as bnn  # noqa: E402
from batchnorm.kernels import triton as tk  # noqa: E402
from batchnorm.nn import act as act_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SLOPE = 0.2
TORCH_ACT = {"relu": F.relu, "leaky_relu": lambda z: F.leaky_relu(z, SLOPE), "silu": F.silu}


@pytest.fixture(autouse=True)
def triton_calls(monkeypatch) -> dict[str, int]:
    """Route CPU tensors to Triton and count the act kernels' calls, to prove the route is taken."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "triton")
    calls: dict[str, int] = {}
    for name in ("forward_train_act", "forward_inference_act", "normalize_act", "backward_act"):
        kernel = getattr(tk, name)

        def counted(*args, _name=name, _kernel=kernel, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(tk, name, counted)
    return calls


@pytest.mark.parametrize(
    ("act", "save_memory", "channels_last"),
    [("relu", False, False), ("leaky_relu", True, False), ("silu", False, True)],
)
def test_batchnorm_act2d_on_triton_matches_torch(act, save_memory, channels_last, triton_calls):
    shape = (3, 4, 3, 5)
    mine = bnn.BatchNormAct2d(4, act=act, negative_slope=SLOPE, save_memory=save_memory).to(DEVICE)
    ref = torch.nn.BatchNorm2d(4).to(DEVICE)
    with torch.no_grad():
        for m in (mine, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, 4))
            m.bias.copy_(torch.linspace(-1, 1, 4))
    torch.manual_seed(0)
    x = torch.randn(shape, device=DEVICE) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, device=DEVICE)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = mine(xa), TORCH_ACT[act](ref(xb))
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    if channels_last:
        assert ya.is_contiguous(memory_format=torch.channels_last)
    mine.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(x), TORCH_ACT[act](ref(x)), rtol=1e-5, atol=1e-5)
    assert triton_calls == {"forward_train_act": 1, "backward_act": 1, "forward_inference_act": 1}


@pytest.mark.parametrize("from_output", [False, True])
def test_split_backward_on_triton_equals_whole_backward(from_output, monkeypatch):
    """The two passes SyncBatchNormAct runs on CUDA (reduce, then dx with the sums) give the
    whole backward's result."""
    from batchnorm.kernels.triton import _dispatch as td

    launches: list[str] = []
    launch = td._backward_launch
    monkeypatch.setattr(td, "_backward_launch", lambda kind, *a: launches.append(kind) or launch(kind, *a))
    torch.manual_seed(1)
    x = torch.randn(4, 3, 6, device=DEVICE) * 2 + 1
    dy = torch.randn_like(x)
    w, b = torch.linspace(0.5, 1.5, 3, device=DEVICE), torch.linspace(-1, 1, 3, device=DEVICE)
    y, mean, _, invstd = act_ops.forward_train_act(x, w, b, 1e-5, "leaky_relu", SLOPE)
    saved = y if from_output else x
    args = (mean, invstd, w, b, "leaky_relu", SLOPE, from_output)
    dx, dgamma, dbeta = act_ops.backward_act(dy, saved, *args)
    sum_dz, sum_dz_xhat = act_ops.backward_reduce_act(dy, saved, *args)
    dx_split = act_ops.backward_dx_act(dy, saved, *args, sum_dz.double(), sum_dz_xhat.double(), 4 * 6)
    torch.testing.assert_close(sum_dz, dbeta, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sum_dz_xhat, dgamma, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx_split, dx, rtol=1e-5, atol=1e-6)
    # whole backward (dx adds up the reduce's partials), then the two split passes
    assert launches == ["both", "reduce", "dx"]
