"""MNIST-1D and synthetic generators; the MNIST loader on the real test set."""

from __future__ import annotations

import gzip
import shutil
import urllib.error

import numpy as np
import pytest

from batchnorm.lab import data, mnist


def test_mnist1d_deterministic_for_a_seed():
    a, b, c = data.mnist1d(1000, seed=3), data.mnist1d(1000, seed=3), data.mnist1d(1000, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)


def test_mnist1d_class_balanced_standardized_and_shaped():
    d = data.mnist1d(2000, seed=0)
    labels = np.concatenate([d.y_train, d.y_test])
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 200))
    assert d.x_train.shape == (1600, 1, 40) and d.x_test.shape == (400, 1, 40)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    x = np.concatenate([d.x_train, d.x_test])
    assert abs(float(x.mean())) < 1e-5 and abs(float(x.std()) - 1) < 1e-5


def test_gaussian_smooth_matches_a_direct_convolution():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 30))
    got = data._gaussian_smooth(x, 2.0)
    k = np.exp(-0.5 * (np.arange(-8, 9) / 2.0) ** 2)
    k /= k.sum()
    padded = np.pad(x, ((0, 0), (8, 8)), mode="symmetric")
    want = np.stack([np.convolve(row, k, mode="valid") for row in padded])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_synthetic_features_badly_scaled_and_deterministic():
    d = data.synthetic(1000, seed=1)
    std = d.x_train[:, 0].std(0)
    assert std.max() / std.min() > 100
    np.testing.assert_array_equal(d.x_train, data.synthetic(1000, seed=1).x_train)


@pytest.mark.parametrize("bad", [{"num_samples": 5}, {"test_fraction": 1.5}])
def test_mnist1d_rejects_bad_arguments(bad):
    with pytest.raises(ValueError, match="num_samples|test_fraction"):
        data.mnist1d(**{"num_samples": 100, **bad})


def test_load_unknown_dataset():
    with pytest.raises(ValueError, match="mnist1d, mnist, synthetic"):
        data.load("cifar")


def test_mnist_test_set_split_8000_2000(mnist_dir):
    d = mnist.load_mnist(mnist_dir, allow_download=False)
    assert d.x_train.shape == (8000, 1, 28, 28) and d.x_test.shape == (2000, 1, 28, 28)
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    assert set(np.unique(d.y_test)) == set(range(10))
    again = mnist.load_mnist(mnist_dir, allow_download=False)
    np.testing.assert_array_equal(d.y_test, again.y_test)
    # train and held-out are disjoint pieces of the 10,000 test images
    full = mnist.read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz").reshape(10_000, -1)
    keys = {row.tobytes() for row in full}
    assert len(keys) > 9900
    train = {(r * 255).round().astype(np.uint8).tobytes() for r in d.x_train.reshape(8000, -1)}
    held = {(r * 255).round().astype(np.uint8).tobytes() for r in d.x_test.reshape(2000, -1)}
    assert train <= keys and held <= keys and len(train & held) <= 10 - (10_000 - len(keys))


def test_mnist_raw_files_read_like_gz(mnist_dir, tmp_path):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(mnist_dir / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    raw, gz = (
        mnist.load_mnist(tmp_path, allow_download=False),
        mnist.load_mnist(mnist_dir, allow_download=False),
    )
    np.testing.assert_array_equal(raw.x_test, gz.x_test)


def test_mnist_wrong_checksum_is_a_clear_error(mnist_dir, tmp_path):
    shutil.copy(mnist_dir / "t10k-labels-idx1-ubyte.gz", tmp_path)
    corrupt = bytearray((mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes())
    corrupt[1000] ^= 0xFF
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(bytes(corrupt))
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz has MD5 \w+, expected 9fb629c4"):
        mnist.load_mnist(tmp_path, allow_download=False)


def test_mnist_missing_offline_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="pass --data-dir"):
        mnist.load_mnist(tmp_path, allow_download=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr(mnist.urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match=r"could not download MNIST file .* \(offline\?\)"):
        mnist.load_mnist(tmp_path / "new")
