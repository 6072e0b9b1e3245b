"""Shared fixtures: the MNIST data beside the checkout, hypothesis settings, seeded RNGs."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

REPO_ROOT = Path(__file__).resolve().parents[1]

# Kernels compile on first use; hypothesis' per-example deadline would count compile time.
settings.register_profile(
    "batchnorm", deadline=None, max_examples=40, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("batchnorm")


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST test set in ../shared/data/mnist (never copied into the repo)."""
    path = Path(os.environ.get("BATCHNORM_MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))
    if not (path / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST test set not found in {path}")
    return path


@pytest.fixture
def float64_gaps():
    """``gaps(module, exact, x, dy, post=None)``: train ``module`` on x (float32) and ``exact`` on
    x in float64 (``post`` applied to exact's output, e.g. an activation), backward with dy;
    returns, for y, dx, dweight and dbias, max |float32 - float64| / max |float64|."""
    import torch

    def gaps(module, exact, x, dy, post=None):
        results = []
        for m, dtype, after in ((module, torch.float32, None), (exact, torch.float64, post)):
            xi = x.detach().to(dtype).requires_grad_()
            y = m(xi) if after is None else after(m(xi))
            y.backward(dy.to(dtype))
            results.append([t.detach().double() for t in (y, xi.grad, m.weight.grad, m.bias.grad)])
        return {
            name: float((got - want).abs().max() / want.abs().max())
            for name, got, want in zip(("y", "dx", "dweight", "dbias"), *results, strict=True)
        }

    return gaps
