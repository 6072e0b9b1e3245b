"""The fast path's NumPy views of a module's tensors stay exact when those tensors change.

Each test changes a parameter or buffer the way users and torch do it (in place, replaced,
``.data =``, ``.to()``, a copy of the module) between two calls, then compares the module with
torch.nn.BatchNorm1d given the same state.
"""

from __future__ import annotations

import copy
import io
import pickle

import numpy as np
import pytest
import torch

import batchnorm.nn as bnn
from batchnorm import kernels
from batchnorm.kernels._dispatch import CheckedRunning, checked_running
from batchnorm.nn import _views

C = 6
TOL = dict(rtol=1e-5, atol=1e-5)


def _step(ours, gen, mode="train", dtype=torch.float32):
    """One call of ``ours`` and of a torch.nn twin loaded with ours' state before: forward and
    backward in "train" or "eval" mode, a forward under no_grad in "predict"."""
    theirs = torch.nn.BatchNorm1d(C, dtype=dtype)
    theirs.load_state_dict(ours.state_dict())
    theirs.momentum, theirs.track_running_stats = ours.momentum, ours.track_running_stats
    ours.train(mode == "train")
    theirs.train(mode == "train")
    x = torch.randn(16, C, generator=gen, dtype=dtype) * 3 + 1
    dy = torch.randn(16, C, generator=gen, dtype=dtype)
    outs = []
    for m in (ours, theirs):
        m.zero_grad()
        if mode == "predict":  # the usual prediction call: no graph
            with torch.no_grad():
                outs.append([m(x), *m.buffers()])
            continue
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(dy)
        outs.append([y, xi.grad, m.weight.grad, m.bias.grad, *m.buffers()])
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def _module():
    bn = bnn.BatchNorm1d(C)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    return bn


def test_views_are_reused_while_nothing_changes():
    bn, gen = _module(), torch.Generator().manual_seed(0)
    _step(bn, gen)
    first = _views._VIEWS[bn][1]
    _step(bn, gen)
    assert _views._VIEWS[bn][1] is first
    assert np.shares_memory(first.weight, bn.weight.detach().numpy())
    assert np.shares_memory(first.running[0], bn.running_mean.numpy())


def test_in_place_updates_are_seen():
    bn, gen = _module(), torch.Generator().manual_seed(1)
    for mode in ("train", "predict"):
        _step(bn, gen, mode)
        _step(bn, gen, mode)
        with torch.no_grad():
            bn.weight.mul_(-2.0)  # an optimizer step
            bn.running_var.add_(4.0)
        bn.load_state_dict({**bn.state_dict(), "bias": torch.linspace(-1, 1, C)})
        _step(bn, gen, mode)


@pytest.mark.parametrize(
    "change",
    [
        "replace_buffer",
        "replace_parameter",
        "data_assignment",
        "momentum",
        "to_float64",
        "no_tracking",
    ],
)
@pytest.mark.parametrize("mode", ["train", "predict"])
def test_changed_tensors_get_new_views(change, mode):
    bn, gen = _module(), torch.Generator().manual_seed(2)
    _step(bn, gen, mode)
    _step(bn, gen, mode)  # views made and reused: the change below must be seen through them
    dtype = torch.float32
    old_mean = bn.running_mean.clone()
    if change == "replace_buffer":
        bn.running_mean = torch.full((C,), 5.0)
        old_mean = bn.running_mean.clone()
    elif change == "replace_parameter":
        bn.weight = torch.nn.Parameter(torch.linspace(0.5, 2.0, C))
    elif change == "data_assignment":
        bn.weight.data = torch.linspace(2.0, 0.5, C)
        bn.running_var.data = torch.full((C,), 9.0)
    elif change == "momentum":
        bn.momentum = 0.7
    elif change == "to_float64":
        bn.double()
        dtype = torch.float64
    elif change == "no_tracking":
        bn.track_running_stats = False
    _step(bn, gen, mode, dtype)
    _step(bn, gen, "eval", dtype)
    _step(bn, gen, "train", dtype)
    if change == "no_tracking":
        torch.testing.assert_close(bn.running_mean, old_mean)  # nothing written to them
    else:
        assert not torch.equal(bn.running_mean, old_mean.to(dtype))


def test_copies_update_their_own_buffers():
    bn, gen = _module(), torch.Generator().manual_seed(3)
    _step(bn, gen)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(bn, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(bn), pickle.loads(pickle.dumps(bn)), torch.load(buffer, weights_only=False)]
    for twin in copies:
        assert twin not in _views._VIEWS
        _step(twin, gen)
        assert twin.num_batches_tracked.item() == 2
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_views_go_with_the_module():
    bn, gen = _module(), torch.Generator().manual_seed(4)
    _step(bn, gen)
    count = len(_views._VIEWS)
    del bn
    assert len(_views._VIEWS) == count - 1


def test_checked_running_validates_once_and_still_checks_x():
    rm, rv, tracked = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros((), np.int64)
    running = checked_running((rm, rv, tracked, 0.1), 3)
    assert type(running) is CheckedRunning
    x = np.random.default_rng(0).normal(size=(8, 3)).astype(np.float32)
    kernels.forward_train(x, None, None, 1e-5, running=running)
    np.testing.assert_allclose(rm, 0.1 * x.mean(0), rtol=1e-5)
    assert tracked == 1
    with pytest.raises(ValueError, match="more than one value per channel"):
        kernels.forward_train(x[:1], None, None, 1e-5, running=running)
    with pytest.raises(ValueError, match=r"running_mean: expected .* shape \(4,\)"):
        kernels.forward_train(np.zeros((8, 4), np.float32), None, None, 1e-5, running=running)
    assert tracked == 1  # nothing updated by the calls that raised
    with pytest.raises(ValueError, match="writeable"):
        rm.flags.writeable = False
        checked_running((rm, rv, None, 0.1), 3)
    with pytest.raises(TypeError, match="momentum"):
        checked_running((rv, rv, None, "0.1"), 3)
