"""Data sets for the lab: MNIST-1D (embedded, the default), MNIST (IDX files) and a synthetic one.

Every loader returns a :class:`Dataset` of float32 inputs and int64 labels, already split into a
training and a held-out part, deterministic for a seed. Only NumPy is needed here.

Why MNIST-1D is the default (Greydanus, 2020, "Scaling down deep learning"): it is generated
procedurally by the code below, so the lab works offline with no download and no extra
dependency (scikit-learn's 8x8 digits would add one); and it is harder than 8x8 digits (an MLP
reaches ~70%, not ~97%), so the differences BN makes in speed, learning-rate tolerance and
initialization stay visible instead of every configuration saturating at the top.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["DATASETS", "Dataset", "load", "mnist1d", "synthetic"]


@dataclass(frozen=True)
class Dataset:
    """A classification data set split into training and held-out parts.

    Shape:
        x_train: ``(N_train, *sample_shape)`` float32; y_train: ``(N_train,)`` int64;
        x_test, y_test likewise with ``N_test`` rows. ``sample_shape`` is ``(1, L)`` for
        1-D signals and ``(1, H, W)`` for images, so a CNN sees one input channel.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_features(self) -> int:
        return int(np.prod(self.sample_shape))

    def describe(self) -> dict:
        return {
            "name": self.name,
            "train": len(self.y_train),
            "test": len(self.y_test),
            "sample_shape": list(self.sample_shape),
            "num_classes": self.num_classes,
        }


# The ten 12-point templates of MNIST-1D, one per digit, as published by Greydanus (2020).
_TEMPLATES = np.array(
    [
        [5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5],
        [5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5],
        [5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5],
        [5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5],
        [5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5],
        [5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5],
        [5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5],
        [5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5],
        [5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5],
    ]
)


def _templates() -> np.ndarray:
    x = _TEMPLATES - _TEMPLATES.mean(1, keepdims=True)
    x /= x.std(1, keepdims=True)
    x -= x[:, :1]  # every template starts and ends at 0, so padding joins it smoothly
    return x / 6.0


def _resample(x: np.ndarray, lengths: np.ndarray, n_out: int) -> np.ndarray:
    """Linear interpolation of row i's first ``lengths[i]`` points onto ``n_out`` even points."""
    t = np.linspace(0.0, 1.0, n_out)[None, :] * (lengths[:, None] - 1)
    left = np.minimum(np.floor(t).astype(np.int64), lengths[:, None] - 2)
    frac = t - left
    rows = np.arange(len(x))[:, None]
    return x[rows, left] * (1 - frac) + x[rows, left + 1] * frac


def _gaussian_smooth(x: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian filter along axis 1 with reflected edges (scipy.ndimage's default, radius 4 sigma)."""
    radius = int(4 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(x, ((0, 0), (radius, radius)), mode="symmetric")
    windows = np.lib.stride_tricks.sliding_window_view(padded, len(kernel), axis=1)
    return windows @ kernel


def mnist1d(
    num_samples: int = 10_000,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    length: int = 40,
) -> Dataset:
    """MNIST-1D: ten 1-D templates, randomly padded, scaled, shifted, sheared and noised.

    Follows Greydanus' recipe: each template (12 points) is padded with 36-60 zeros, stretched
    to 72 points, scaled by ``1 + 0.4 (u - 0.5)``, circularly shifted by 0-47 points; the padding
    is filled with smooth noise (Gaussian-filtered, sigma 2, scale 0.25), white noise (0.02) is
    added everywhere, a linear shear ``0.75 (u - 0.5) * t`` is subtracted, and the signal is
    resampled to ``length`` points. The whole set is then standardized (one mean, one std).

    Class-balanced (``num_samples // 10`` per class), shuffled, deterministic for ``seed``.

    Shape:
        x: ``(N, 1, length)``; y: ``(N,)``.
    """
    if num_samples < 20:
        raise ValueError(
            f"mnist1d: num_samples must be >= 20 (two per class), got {num_samples}; use e.g. 10000"
        )
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"mnist1d: test_fraction must be in (0, 1), got {test_fraction}; use e.g. 0.2")
    rng = np.random.default_rng(seed)
    templates = _templates()
    per_class = num_samples // 10
    y = np.repeat(np.arange(10), per_class)
    n, width = len(y), 12 + 60
    # 1e-8 marks the template's own points so the noise below fills only the padding.
    padded = np.zeros((n, width))
    padded[:, :12] = templates[y] + 1e-8
    pad = 36 + (rng.random(n) * 25).astype(np.int64)
    x = _resample(padded, 12 + pad, width)
    x *= 1 + 0.4 * (rng.random(n)[:, None] - 0.5)
    shift = rng.integers(0, 48, n)
    x = x[np.arange(n)[:, None], (np.arange(width)[None, :] - shift[:, None]) % width]
    corr_noise = _gaussian_smooth(0.25 * rng.standard_normal((n, width)), 2.0)
    x = np.where(x != 0, x, corr_noise)
    x = x + 0.02 * rng.standard_normal((n, width))
    x = x - 0.75 * (rng.random(n)[:, None] - 0.5) * np.linspace(-0.5, 0.5, width)[None, :]
    x = _resample(x, np.full(n, width), length)
    x = (x - x.mean()) / x.std()
    order = rng.permutation(n)
    return _split("mnist1d", x[order, None, :], y[order], test_fraction, num_classes=10)


def synthetic(
    num_samples: int = 10_000,
    *,
    seed: int = 0,
    num_features: int = 32,
    num_classes: int = 10,
    test_fraction: float = 0.2,
    scale_range: float = 100.0,
) -> Dataset:
    """Gaussian class clusters seen through badly scaled, offset features.

    ``x = (mu_y + z) * s + o`` with ``z ~ N(0, I)``, class centres ``mu_y ~ N(0, I)``, per-feature
    scales ``s`` log-uniform in ``[1/scale_range, scale_range]`` and offsets ``o ~ N(0, scale^2)``:
    the classes are easy to separate once each feature is standardized, hard for plain SGD
    before, which is exactly what normalizing the layer inputs is meant to fix.

    Shape:
        x: ``(N, 1, num_features)``; y: ``(N,)``.
    """
    if num_samples < 2 * num_classes:
        raise ValueError(
            f"synthetic: num_samples must be >= 2 * num_classes = {2 * num_classes}, got {num_samples}"
        )
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((num_classes, num_features))
    scales = np.exp(rng.uniform(-np.log(scale_range), np.log(scale_range), num_features))
    offsets = rng.standard_normal(num_features) * scales
    y = np.repeat(np.arange(num_classes), num_samples // num_classes)
    x = (centres[y] + rng.standard_normal((len(y), num_features))) * scales + offsets
    order = rng.permutation(len(y))
    return _split("synthetic", x[order, None, :], y[order], test_fraction, num_classes)


def _split(name: str, x: np.ndarray, y: np.ndarray, test_fraction: float, num_classes: int) -> Dataset:
    n_test = int(round(len(y) * test_fraction))
    n_train = len(y) - n_test
    return Dataset(
        name=name,
        x_train=np.ascontiguousarray(x[:n_train], dtype=np.float32),
        y_train=y[:n_train].astype(np.int64),
        x_test=np.ascontiguousarray(x[n_train:], dtype=np.float32),
        y_test=y[n_train:].astype(np.int64),
        num_classes=num_classes,
    )


DATASETS = ("mnist1d", "mnist", "synthetic")


def load(name: str = "mnist1d", *, data_dir: str | Path | None = None, seed: int = 0) -> Dataset:
    """The data set called ``name`` (one of :data:`DATASETS`).

    ``seed`` fixes generated data (mnist1d, synthetic); MNIST's split does not depend on it, so
    every seed is evaluated on the same held-out images.
    """
    if name == "mnist1d":
        return mnist1d(seed=seed)
    if name == "synthetic":
        return synthetic(seed=seed)
    if name == "mnist":
        from batchnorm.lab.mnist import load_mnist

        return load_mnist(data_dir)
    raise ValueError(f"dataset must be one of {', '.join(DATASETS)}, got {name!r}")
