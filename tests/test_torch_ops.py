"""The tensor-level dispatch: non-finite values behave as in torch.nn (propagate, no warning)."""

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
