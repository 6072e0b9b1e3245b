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
