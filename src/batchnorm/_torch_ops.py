"""The kernel contract on torch tensors: one function per kernel, dispatched by device.

CPU tensors run the numba kernels on zero-copy NumPy views; CUDA tensors run the Triton
kernels (``batchnorm.kernels.triton``), imported only when a CUDA tensor arrives. Setting
``BATCHNORM_BACKEND=triton`` sends CPU tensors to the Triton kernels too: with
``TRITON_INTERPRET=1`` that runs every module on the GPU code path without a GPU. No autograd
here: ``functional`` and the modules build their gradients from these pieces.

float16 and bfloat16 inputs are computed in float32 (NumPy has no bfloat16) and cast back;
statistics come back in the compute dtype (float64 for float64 input, float32 otherwise),
except that ``forward_train`` and ``channel_stats(x, stats64=True)`` give float64 ones on the
numba kernels, for a backward to form ``x - mean`` from; statistics passed in as float64 reach
the kernels unrounded.

Functions (same names and meaning as ``batchnorm.kernels``)::

    forward_train(x, weight, bias, eps)        -> (y, mean, var, invstd)   var biased
    normalize(x, mean, invstd, weight, bias)   -> y = (x - mean) * invstd * weight + bias
    channel_stats(x)                           -> (mean, var)
    backward_reduce(dy, x, mean, invstd)       -> (sum_dy, sum_dy_xhat)
    backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count) -> dx
    backward(dy, x, mean, invstd, weight)      -> (dx, dweight, dbias)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from batchnorm import kernels as cpu_kernels

_NUMPY_DTYPES = (torch.float32, torch.float64)


# os.environ's own store (what os.environ[...] = and monkeypatch.setenv write through), read
# without get()'s key encoding and value decoding: 1.18 -> 0.07 us, on every module call.
_ENVIRON_STORE = getattr(os.environ, "_data", None)
try:
    _BACKEND_KEY = os.environ.encodekey("BATCHNORM_BACKEND")  # type: ignore[attr-defined]
    _TRITON_VALUE = os.environ.encodevalue("triton")  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - another os.environ: the public (slower) read
    _ENVIRON_STORE = None


def triton_on_cpu() -> bool:
    """``BATCHNORM_BACKEND=triton``: CPU tensors go to the Triton kernels (read per call, so
    tests can switch it with monkeypatch.setenv)."""
    if type(_ENVIRON_STORE) is dict:
        return _ENVIRON_STORE.get(_BACKEND_KEY) == _TRITON_VALUE
    return os.environ.get("BATCHNORM_BACKEND") == "triton"  # pragma: no cover


# Per-channel value count from which the Triton kernels beat torch's own CUDA batch norm
# (cuDNN) on a contiguous (N, C, *spatial) tensor: on an H100, forward+backward per call,
# (64, 64, 112, 112) (802k values a channel) 1.9x in float32 and 2.4x in bfloat16,
# (256, 3, 224, 224) (12.8M) 24x and 30x; at 200k values (56x56 images, batch 64) and on every
# channels-last or (N, C) shape, torch was faster, by up to 10x on small layers: the ~100 us
# of Python host time per Triton forward exceeds those layers' GPU time.
CUDA_TRITON_MIN_COUNT = 1 << 19


def cuda_uses_torch(x: torch.Tensor) -> bool:
    """True when a CUDA tensor should run torch's own batch norm rather than the Triton kernels.

    ``BATCHNORM_BACKEND``: ``triton`` always runs the Triton kernels, ``torch`` always torch's;
    unset (``auto``) picks Triton only for contiguous inputs of at least
    ``CUDA_TRITON_MIN_COUNT`` values per channel, where it measured faster.
    """
    backend = os.environ.get("BATCHNORM_BACKEND", "auto")
    if backend == "triton":
        return False
    if backend == "torch" or x.dim() < 3 or not x.is_contiguous():
        return True
    return x.numel() // x.shape[1] < CUDA_TRITON_MIN_COUNT


def torch_kernel_route(x: torch.Tensor) -> bool:
    """True when ``x`` runs torch's own batch norm: a CUDA tensor for which ``cuda_uses_torch``."""
    return x.is_cuda and cuda_uses_torch(x)


def _backend(x: torch.Tensor) -> Any:
    if x.device.type == "cpu" and not triton_on_cpu():
        return None
    if x.device.type in ("cuda", "cpu"):
        from batchnorm.kernels import triton as gpu_kernels

        return gpu_kernels
    raise NotImplementedError(
        f"batchnorm has kernels for CPU and CUDA tensors, got a tensor on {x.device}; "
        "move it to the CPU or a CUDA device, or use torch.nn.BatchNorm*d there"
    )


def _to_numpy(t: torch.Tensor | None, compute_dtype: torch.dtype) -> Any:
    if t is None:
        return None
    t = t.detach()
    if t.dtype != compute_dtype:
        t = t.to(compute_dtype)
    return t.numpy()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _from_numpy(a: Any, dtype: torch.dtype) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if t.dtype == dtype else t.to(dtype)


def _on_cpu(
    name: str, tensors: tuple[torch.Tensor | None, ...], extra: tuple, like: torch.Tensor, n_full: int
) -> tuple[torch.Tensor, ...]:
    """Run kernel ``name`` on NumPy views; the first ``n_full`` outputs take ``like``'s dtype."""
    compute = _compute_dtype(like)
    arrays = [_to_numpy(t, compute) for t in tensors]
    # torch propagates inf/nan silently; NumPy's warnings from the dispatch's small per-channel
    # arithmetic would surface as RuntimeWarnings that torch.nn never raises.
    with np.errstate(all="ignore"):
        outputs = getattr(cpu_kernels, name)(*arrays, *extra)
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    return tuple(_from_numpy(out, like.dtype if i < n_full else compute) for i, out in enumerate(outputs))


def _run(name: str, tensors: tuple, extra: tuple, like: torch.Tensor, n_full: int) -> tuple:
    gpu = _backend(like)
    if gpu is not None:
        fn: Callable = getattr(gpu, name)
        result = fn(*tensors, *extra)
        return result if isinstance(result, tuple) else (result,)
    return _on_cpu(name, tensors, extra, like, n_full)


def _direct(x: torch.Tensor) -> bool:
    """True for the common case: a float32/float64 CPU tensor on the numba kernels.

    Those skip ``_run``'s generic conversions ((64, 16) float32 forward_train through this
    module, one thread: 30 -> 20 us). Outputs are allocated by the kernels (NumPy, in x's
    layout) and wrapped with ``torch.from_numpy``, not allocated with ``torch.empty_like``:
    NumPy asks for transparent huge pages on large arrays (madvise, the mode here), torch
    does not, and a fresh 51 MB output then costs ~12.5k page faults instead of ~25. One
    thread, eval module call on (16, 64, 112, 112): 36 ms with torch.empty_like, 10 ms with
    NumPy's allocation (torch.nn: 27 ms).
    """
    return x.dtype in _NUMPY_DTYPES and x.device.type == "cpu" and not triton_on_cpu()


# ``numpy(force=True)`` is ``detach().cpu().resolve_conj().resolve_neg().numpy()`` in one C++
# call: the same zero-copy view of a real CPU tensor, 1.06 -> 0.88 us.
def _np(t: torch.Tensor | None) -> Any:
    return None if t is None else t.numpy(force=True)


def _np_as(t: torch.Tensor | None, dtype: torch.dtype) -> Any:
    if t is None:
        return None
    return (t if t.dtype == dtype else t.detach().to(dtype)).numpy(force=True)


def _np_stat(t: torch.Tensor, dtype: torch.dtype) -> Any:
    """A statistic for the kernels: float64 as it is (they compute in float64), else in x's dtype."""
    return _np(t) if t.dtype == torch.float64 else _np_as(t, dtype)


def forward_train(x, weight, bias, eps: float):
    """The statistics come in float64 where the numba kernels run on x directly (every caller
    hands them to a backward: ``kernels.forward_train``'s ``stats64``), else in the compute dtype."""
    if _direct(x):
        arrays = cpu_kernels.forward_train(
            _np(x), _np_as(weight, x.dtype), _np_as(bias, x.dtype), eps, stats64=True
        )
        return tuple(torch.from_numpy(a) for a in arrays)
    return _run("forward_train", (x, weight, bias), (eps,), x, n_full=1)


def normalize(x, mean, invstd, weight, bias):
    if _direct(x):
        d = x.dtype
        return torch.from_numpy(
            cpu_kernels.normalize(
                _np(x), _np_stat(mean, d), _np_stat(invstd, d), _np_as(weight, d), _np_as(bias, d)
            )
        )
    return _run("normalize", (x, mean, invstd, weight, bias), (), x, n_full=1)[0]


def normalize_running(x, running_mean, running_var, eps: float, weight, bias):
    """``normalize`` with ``invstd = 1 / sqrt(running_var + eps)`` formed in float64 (CPU only)."""
    d = x.dtype
    return torch.from_numpy(
        cpu_kernels.normalize_running(
            _np(x), _np_as(running_mean, d), _np(running_var), eps, _np_as(weight, d), _np_as(bias, d)
        )
    )


def normalize_running_arrays(x, eps: float, arrays: Any):
    """``normalize_running`` with NumPy views of running_mean, running_var, weight and bias in
    ``arrays`` (``nn._views.Views``: x's dtype, made once per module)."""
    return torch.from_numpy(
        cpu_kernels.normalize_running(
            x.numpy(force=True), arrays.running_mean, arrays.running_var, eps, arrays.weight, arrays.bias
        )
    )


def channel_stats(x, stats64: bool = False):
    """``stats64=True``: float64 statistics where the numba kernels run on x directly."""
    if _direct(x):
        return tuple(torch.from_numpy(a) for a in cpu_kernels.channel_stats(_np(x), stats64=stats64))
    return _run("channel_stats", (x,), (), x, n_full=0)


def backward_reduce(dy, x, mean, invstd):
    if _direct(x) and dy.dtype == x.dtype:
        d = x.dtype
        with np.errstate(all="ignore"):  # as _on_cpu: non-finite values propagate silently
            sums = cpu_kernels.backward_reduce(_np(dy), _np(x), _np_stat(mean, d), _np_stat(invstd, d))
        return tuple(torch.from_numpy(a) for a in sums)
    return _run("backward_reduce", (dy, x, mean, invstd), (), x, n_full=0)


def backward_dx(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count: int):
    if _direct(x) and dy.dtype == x.dtype:
        d = x.dtype
        with np.errstate(all="ignore"):
            dx = cpu_kernels.backward_dx(
                _np(dy), _np(x), _np_stat(mean, d), _np_stat(invstd, d), _np_as(weight, d),
                _np_as(sum_dy, d), _np_as(sum_dy_xhat, d), count,
            )  # fmt: skip
        return torch.from_numpy(dx)
    return _run("backward_dx", (dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat), (count,), x, n_full=1)[0]


def backward_arrays(dy, x, mean: Any, invstd: Any, weight):
    """``backward`` for a ``_direct`` x with the statistics as NumPy arrays (the eager module path)."""
    dy_np = _np(dy) if dy.dtype == x.dtype else _np_as(dy, x.dtype)
    dx, dweight, dbias = cpu_kernels.backward(dy_np, _np(x), mean, invstd, _np_as(weight, x.dtype))
    return torch.from_numpy(dx), torch.from_numpy(dweight), torch.from_numpy(dbias)


def backward_arrays_np(dy, dtype: torch.dtype, x_np: Any, mean: Any, invstd: Any, w_np: Any):
    """``backward_arrays`` with x and weight already NumPy views in x's dtype ``dtype``."""
    dx, dweight, dbias = cpu_kernels.backward(_np_as(dy, dtype), x_np, mean, invstd, w_np)
    return torch.from_numpy(dx), torch.from_numpy(dweight), torch.from_numpy(dbias)


def backward(dy, x, mean, invstd, weight):
    if _direct(x) and dy.dtype == x.dtype:
        d = x.dtype
        return backward_arrays(dy, x, _np_stat(mean, d), _np_stat(invstd, d), weight)
    return _run("backward", (dy, x, mean, invstd, weight), (), x, n_full=1)
