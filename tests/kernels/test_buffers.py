"""The output-buffer cache: reuse only what nothing references, within its limit."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from batchnorm import kernels, reference
from batchnorm.kernels import _buffers

SHAPE = (64, 32, 8, 8)  # 512 KiB in float32: cached (>= MIN_BYTES)


@pytest.fixture(autouse=True)
def fresh_cache():
    keep = kernels.cache_limit()
    kernels.set_cache_limit(1 << 30)
    kernels.empty_cache()
    yield
    kernels.set_cache_limit(keep)
    kernels.empty_cache()


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]


def _x(seed: int = 0, shape: tuple[int, ...] = SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, shape).astype(np.float32)


def test_a_dropped_output_is_reused():
    x = _x()
    first = _address(kernels.forward_train(x, None, None, 1e-5)[0])
    second = _address(kernels.forward_train(x, None, None, 1e-5)[0])
    assert first == second
    assert kernels.cached_bytes() == x.nbytes


@pytest.mark.parametrize("keep", ["array", "view", "tensor", "tensor view"])
def test_a_referenced_output_is_never_reused(keep):
    x1, x2 = _x(1), _x(2)
    y1 = kernels.forward_train(x1, None, None, 1e-5)[0]
    expected = y1.copy()
    if keep == "array":
        held = y1
    elif keep == "view":
        held = y1[1:, ::2]
    elif keep == "tensor":
        held = torch.from_numpy(y1)
    else:
        held = torch.from_numpy(y1).transpose(0, 1)
    address = _address(y1)
    del y1
    y2 = kernels.forward_train(x2, None, None, 1e-5)[0]
    assert _address(y2) != address
    np.testing.assert_allclose(y2, reference.forward(x2, np.ones(32), np.zeros(32))[0], rtol=1e-5, atol=1e-5)
    kept = held.numpy() if isinstance(held, torch.Tensor) else held
    sliced = {"array": expected, "view": expected[1:, ::2], "tensor": expected}
    np.testing.assert_array_equal(kept, sliced.get(keep, expected.transpose(1, 0, 2, 3)))


def test_channels_last_outputs_keep_the_layout():
    x = np.ascontiguousarray(_x().transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)  # channels-last
    for _ in range(2):  # fresh, then from the cache
        y = kernels.forward_train(x, None, None, 1e-5)[0]
        assert y.strides == x.strides
        np.testing.assert_allclose(y, reference.forward(x, np.ones(32), np.zeros(32))[0], atol=1e-5)


def test_small_outputs_bypass_the_cache():
    kernels.forward_train(_x(shape=(16, 16, 4, 4)), None, None, 1e-5)
    assert kernels.cached_bytes() == 0


def test_the_limit_bounds_what_is_held():
    x = _x()
    kernels.set_cache_limit(x.nbytes)
    a = kernels.forward_train(x, None, None, 1e-5)[0]
    b = kernels.forward_train(x, None, None, 1e-5)[0]  # a is in use: b allocated outside
    assert kernels.cached_bytes() == x.nbytes
    assert _address(a) != _address(b)
    del a, b
    kernels.set_cache_limit(0)  # drops the free buffer
    assert kernels.cached_bytes() == 0
    kernels.forward_train(x, None, None, 1e-5)
    assert kernels.cached_bytes() == 0


def test_free_buffers_are_dropped_least_recently_used_first():
    old, new = _x(shape=(128, 32, 8, 8)), _x(shape=(64, 32, 8, 8))
    kernels.set_cache_limit(old.nbytes + new.nbytes)
    kernels.forward_train(old, None, None, 1e-5)
    kernels.forward_train(new, None, None, 1e-5)
    assert kernels.cached_bytes() == old.nbytes + new.nbytes
    third = _x(shape=(32, 32, 8, 8))
    kernels.forward_train(third, None, None, 1e-5)  # needs room: the least recently used goes
    assert sorted(_buffers._buffers) == sorted([new.nbytes, third.nbytes])
    assert kernels.cached_bytes() == new.nbytes + third.nbytes


def test_empty_cache_keeps_buffers_in_use():
    x = _x()
    y = kernels.forward_train(x, None, None, 1e-5)[0]
    kernels.forward_train(_x(shape=(128, 32, 8, 8)), None, None, 1e-5)
    kernels.empty_cache()
    assert kernels.cached_bytes() == x.nbytes  # y's buffer stays: it is in use
    assert _address(kernels.forward_train(x, None, None, 1e-5)[0]) != _address(y)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_set_cache_limit_rejects_bad_values(bad):
    with pytest.raises(ValueError, match="set_cache_limit: nbytes must be an int >= 0"):
        kernels.set_cache_limit(bad)
    assert kernels.cache_limit() == 1 << 30


def test_a_bad_environment_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("BATCHNORM_BUFFER_CACHE_MB", "lots")
    with pytest.raises(ValueError, match="BATCHNORM_BUFFER_CACHE_MB: expected a whole number"):
        _buffers._limit_from_env()
    monkeypatch.setenv("BATCHNORM_BUFFER_CACHE_MB", "64")
    assert _buffers._limit_from_env() == 64 << 20


def test_threads_never_share_a_buffer():
    inputs = [_x(seed) for seed in range(4)]
    expected = [reference.forward(x, np.ones(32), np.zeros(32))[0] for x in inputs]
    errors: list[float] = []

    def work(i: int) -> None:
        for _ in range(20):
            y = kernels.forward_train(inputs[i], None, None, 1e-5)[0]
            errors.append(float(np.abs(y - expected[i]).max()))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 80 and max(errors) < 1e-4


def test_module_gradients_survive_later_steps():
    """x.grad holds a cached buffer (autograd takes dx as is): the next step must not write it."""
    import batchnorm.nn

    bn = batchnorm.nn.BatchNorm2d(32)
    x = torch.from_numpy(_x(5)).requires_grad_(True)
    dy = torch.from_numpy(_x(6))
    bn(x).backward(dy)
    grad = x.grad
    expected = grad.clone()
    x.grad = None
    bn(x).backward(dy * 2)
    torch.testing.assert_close(grad, expected, rtol=0, atol=0)
    torch.testing.assert_close(x.grad, 2 * expected, rtol=1e-5, atol=1e-6)
