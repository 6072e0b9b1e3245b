"""Every BN module on the Triton code path, through the interpreter (BATCHNORM_BACKEND=triton).

The kernel tests check the Triton functions one by one; this checks that the modules, their
autograd and running statistics give torch.nn's results when the dispatch sends tensors there.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import batchnorm.nn as bnn  # noqa: E402
from batchnorm.kernels import triton as tk  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def triton_calls(monkeypatch) -> dict[str, int]:
    """Route CPU tensors to Triton and count the kernel calls, to prove the route is taken."""
    monkeypatch.setenv("BATCHNORM_BACKEND", "triton")
    calls: dict[str, int] = {}
    for name in ("forward_train", "normalize", "backward"):
        kernel = getattr(tk, name)

        def counted(*args, _name=name, _kernel=kernel, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _kernel(*args, **kwargs)

        monkeypatch.setattr(tk, name, counted)
    return calls


@pytest.mark.parametrize(
    ("ours", "theirs", "shape", "channels_last"),
    [
        (bnn.BatchNorm1d, torch.nn.BatchNorm1d, (12, 5), False),
        (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 5, 6), False),
        (bnn.BatchNorm2d, torch.nn.BatchNorm2d, (3, 4, 5, 6), True),
        (bnn.BatchNorm3d, torch.nn.BatchNorm3d, (2, 3, 2, 3, 4), False),
    ],
)
def test_module_on_triton_matches_torch(ours, theirs, shape, channels_last, triton_calls):
    torch.manual_seed(0)
    mine, ref = ours(shape[1]).to(DEVICE), theirs(shape[1]).to(DEVICE)
    with torch.no_grad():
        for m in (mine, ref):
            m.weight.copy_(torch.linspace(0.5, 1.5, shape[1]))
            m.bias.copy_(torch.linspace(-1, 1, shape[1]))
    x = torch.randn(shape, device=DEVICE) * 3 + 2
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, device=DEVICE)
    for _step in range(2):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = mine(xa), ref(xb)
        ya.backward(dy)
        yb.backward(dy)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        if channels_last:
            assert ya.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(mine.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine.running_mean, ref.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mine.running_var, ref.running_var, rtol=1e-5, atol=1e-6)
    mine.eval(), ref.eval()
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-5, atol=1e-5)
    assert triton_calls.get("forward_train") == 2 and triton_calls.get("backward") == 2
    assert triton_calls.get("normalize", 0) >= 1
