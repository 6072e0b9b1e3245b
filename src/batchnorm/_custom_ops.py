"""Batch norm as ``torch.library`` custom ops: one node for autograd, torch.compile and torch.export.

Four ops in the ``batchnorm`` namespace, each a thin wrapper over the kernel contract of
``batchnorm._torch_ops`` (CPU: numba kernels on NumPy views; CUDA: Triton)::

    batchnorm::forward_train(x, weight, bias, eps)            -> (y, mean, var, invstd)
    batchnorm::backward_train(dy, x, mean, invstd, weight)    -> (dx, dweight, dbias)
    batchnorm::forward_inference(x, rmean, rvar, weight, bias, eps) -> y
    batchnorm::backward_inference(dy, x, rmean, rvar, weight, eps)  -> (dx, dweight, dbias)

Training mode (batch statistics, ``m = N * prod(spatial)`` values per channel)::

    y  = weight * (x - mean) * invstd + bias,   invstd = 1 / sqrt(var + eps)
    dx = weight * invstd * (dy - sum(dy) / m - x_hat * sum(dy * x_hat) / m)
    dweight = sum(dy * x_hat),  dbias = sum(dy)

Prediction mode (running statistics are constants, so dx has no mean/var terms)::

    y  = weight * (x - running_mean) / sqrt(running_var + eps) + bias
    dx = dy * weight / sqrt(running_var + eps)

Every op has a fake (meta) implementation giving shapes, dtypes and x's memory layout, so the
compilers trace without running a kernel. The backward ops have no autograd of their own:
double backward raises. ``mean``, ``var`` and ``invstd`` are marked non-differentiable, so a
caller that builds a loss on them gets an error instead of a silently missing gradient.

Shape:
    x, y, dy, dx: ``(N, C, *spatial)``, any strides (outputs keep x's layout); everything else
    ``(C,)``. Parameter gradients come in the compute dtype (float64 for float64 input,
    float32 otherwise); so do the statistics, except ``forward_train``'s on the CPU kernels
    (float32/float64 x), which are float64: the backward forms ``x - mean`` from them, and a
    float32-rounded mean is off by up to ~6e-8 |mean| (5% of the std at mean 1e4, std 1e-2).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from batchnorm import _torch_ops

__all__ = [
    "backward_inference",
    "backward_train",
    "batch_norm_inference",
    "batch_norm_train",
    "forward_inference",
    "forward_train",
]


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _standard_layout(x: Tensor) -> bool:
    if x.is_contiguous():
        return True
    if x.ndim == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    return x.ndim == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)


def _like(out: Tensor, x: Tensor) -> Tensor:
    """``out`` with the strides ``torch.empty_like(x)`` would have (what the fake impls promise)."""
    if out.stride() == x.stride() and _standard_layout(x):
        return out  # the common case, decided without allocating
    template = torch.empty_like(x)
    if out.stride() == template.stride():
        return out
    return template.copy_(out)


def _stats_like(x: Tensor, count: int = 1) -> tuple[Tensor, ...]:
    channels = x.shape[1]
    return tuple(x.new_empty((channels,), dtype=_compute_dtype(x)) for _ in range(count))


def _train_stats_dtype(x: Tensor) -> torch.dtype:
    """The dtype of ``forward_train``'s statistics: float64 where the numba kernels run on x
    directly (CPU float32/float64), so the backward forms ``x - mean`` from the mean the
    forward used; x's compute dtype elsewhere (Triton, float16/bfloat16 on CPU)."""
    return torch.float64 if _torch_ops._direct(x) else _compute_dtype(x)


def _invstd(running_var: Tensor, eps: float, x: Tensor) -> Tensor:
    return torch.rsqrt(running_var.to(_compute_dtype(x)) + eps)


def _forward_train_impl(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, mean, var, invstd = _torch_ops.forward_train(x, weight, bias, eps)
    return _like(y, x), mean, var, invstd


forward_train = torch.library.custom_op("batchnorm::forward_train", _forward_train_impl, mutates_args=())


@forward_train.register_fake
def _(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    channels, dtype = x.shape[1], _train_stats_dtype(x)
    return (torch.empty_like(x), *(x.new_empty((channels,), dtype=dtype) for _ in range(3)))


def _backward_train_impl(
    dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None
) -> tuple[Tensor, Tensor, Tensor]:
    # autograd hands over dy in whatever layout the next op produced (an expanded scalar after
    # .sum(), a contiguous grad for a channels-last x): give the kernels x's layout.
    dy = _like(dy, x)
    dx, dweight, dbias = _torch_ops.backward(dy, x, mean, invstd, weight)
    return _like(dx, x), dweight, dbias


backward_train = torch.library.custom_op("batchnorm::backward_train", _backward_train_impl, mutates_args=())


@backward_train.register_fake
def _(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None):
    return (torch.empty_like(x), *_stats_like(x, 2))


def _forward_inference_impl(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    if _torch_ops._direct(x) and running_var.device.type == "cpu":
        # invstd in NumPy float64 (what the kernel works in anyway): rsqrt + add + cast as
        # torch ops cost ~6 us of a (64, 16) eval call.
        return _torch_ops.normalize_running(x, running_mean, running_var, eps, weight, bias)
    mean = running_mean.to(_compute_dtype(x))
    y = _torch_ops.normalize(x, mean, _invstd(running_var, eps, x), weight, bias)
    return _like(y, x)


forward_inference = torch.library.custom_op(
    "batchnorm::forward_inference", _forward_inference_impl, mutates_args=()
)


@forward_inference.register_fake
def _(x, running_mean, running_var, weight, bias, eps):
    return torch.empty_like(x)


def _backward_inference_impl(
    dy: Tensor, x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor]:
    dy = _like(dy, x)
    mean = running_mean.to(_compute_dtype(x))
    invstd = _invstd(running_var, eps, x)
    # dx = dy * weight * invstd is normalize() with mean 0 and no bias
    dx = _torch_ops.normalize(dy, torch.zeros_like(mean), invstd, weight, None)
    dbias, dweight = _torch_ops.backward_reduce(dy, x, mean, invstd)
    return _like(dx, x), dweight, dbias


backward_inference = torch.library.custom_op(
    "batchnorm::backward_inference", _backward_inference_impl, mutates_args=()
)


@backward_inference.register_fake
def _(dy, x, running_mean, running_var, weight, eps):
    return (torch.empty_like(x), *_stats_like(x, 2))


def _param_grad(grad: Tensor, param: Tensor | None, needed: bool) -> Tensor | None:
    if param is None or not needed:
        return None
    return grad.to(param.dtype)


def _setup_train(ctx, inputs, output) -> None:
    x, weight, bias, _ = inputs
    _, mean, var, invstd = output
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, var, invstd)


def _backward_train(ctx, dy, _dmean, _dvar, _dinvstd):
    x, weight, mean, invstd = ctx.saved_tensors
    op = backward_train if _tracing() else _backward_train_impl
    dx, dweight, dbias = op(dy, x, mean, invstd, weight)
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        _param_grad(dweight, weight, needs[1]),
        dbias.to(ctx.bias_dtype) if needs[2] else None,
        None,
    )


def _setup_inference(ctx, inputs, output) -> None:
    x, running_mean, running_var, weight, bias, eps = inputs
    ctx.save_for_backward(x, running_mean, running_var, weight)
    ctx.eps = eps
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward_inference(ctx, dy):
    x, running_mean, running_var, weight = ctx.saved_tensors
    op = backward_inference if _tracing() else _backward_inference_impl
    dx, dweight, dbias = op(dy, x, running_mean, running_var, weight, ctx.eps)
    needs = ctx.needs_input_grad
    return (
        dx if needs[0] else None,
        None,
        None,
        _param_grad(dweight, weight, needs[3]),
        dbias.to(ctx.bias_dtype) if needs[4] else None,
        None,
    )


forward_train.register_autograd(_backward_train, setup_context=_setup_train)
forward_inference.register_autograd(_backward_inference, setup_context=_setup_inference)


def _tracing() -> bool:
    """True when a compiler or tracer records ops, so the BN must appear as the custom op."""
    return (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or is_in_torch_dispatch_mode()  # make_fx, FakeTensorMode, FlopCounter, ...
    )


class _Train(torch.autograd.Function):
    """Eager fast path for ``forward_train``: same impl and backward, without the op dispatch.

    Old-style ``forward(ctx, ...)``: with a separate ``setup_context`` torch binds the
    arguments through ``inspect.signature`` on every call (~60 us).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps):  # type: ignore[override]
        output = _forward_train_impl(x, weight, bias, eps)
        _setup_train(ctx, (x, weight, bias, eps), output)
        return output

    backward = staticmethod(_backward_train)  # type: ignore[assignment]


class _Inference(torch.autograd.Function):
    """Eager fast path for ``forward_inference``."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):  # type: ignore[override]
        output = _forward_inference_impl(x, running_mean, running_var, weight, bias, eps)
        _setup_inference(ctx, (x, running_mean, running_var, weight, bias, eps), output)
        return output

    backward = staticmethod(_backward_inference)  # type: ignore[assignment]


def _needs_grad(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> bool:
    return torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )


# ``Function.apply`` is a Python wrapper (argument binding, functorch unwrapping) around the
# C++ apply; outside functorch transforms it only forwards the arguments. Calling the C++
# apply directly: 7.5 -> 5.1 us per call (measured on a trivial Function).
_TRAIN_APPLY = super(torch.autograd.Function, _Train).apply
_INFERENCE_APPLY = super(torch.autograd.Function, _Inference).apply


def batch_norm_train(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``forward_train`` with autograd: the op when traced, a plain autograd.Function in eager.

    The custom-op dispatch costs about 100 us per call in eager mode (measured on (8, 4):
    131 us vs 69 us for the bare kernels, 239 us with autograd), which dominates small layers;
    compilers and exporters need the op, eager execution does not. Without any input that
    needs a gradient the impl runs bare (no graph node to build).
    """
    if _tracing() or type(x) is not torch.Tensor:
        return forward_train(x, weight, bias, eps)
    if not _needs_grad(x, weight, bias):
        return _forward_train_impl(x, weight, bias, eps)
    if torch._C._are_functorch_transforms_active():
        return _Train.apply(x, weight, bias, eps)
    return _TRAIN_APPLY(x, weight, bias, eps)


def batch_norm_inference(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
) -> Tensor:
    """``forward_inference`` with autograd; same dispatch rule as ``batch_norm_train``."""
    if _tracing() or type(x) is not torch.Tensor:
        return forward_inference(x, running_mean, running_var, weight, bias, eps)
    if not _needs_grad(x, weight, bias):
        # prediction under no_grad/inference_mode, the usual eval call: no graph node to
        # build ((64, 16) module call: 83 -> 41 us, one thread)
        return _forward_inference_impl(x, running_mean, running_var, weight, bias, eps)
    if torch._C._are_functorch_transforms_active():
        return _Inference.apply(x, running_mean, running_var, weight, bias, eps)
    return _INFERENCE_APPLY(x, running_mean, running_var, weight, bias, eps)


def _train_eager_backward(ctx, dy):  # type: ignore[no-untyped-def]
    # Unpacking checks the saved tensors' version counters (x or weight modified in place
    # since the forward raises); the kernel then reads the NumPy views made in the forward,
    # which share their memory: 2 x ~1.3 us of detach().numpy() less per backward.
    x, _ = ctx.saved_tensors
    x_np, w_np, mean, invstd = ctx.arrays
    dx, dweight, dbias = _torch_ops.backward_arrays_np(dy, x.dtype, x_np, mean, invstd, w_np)
    needs = ctx.needs_input_grad
    # The fast path guarantees weight and bias have x's dtype, which the kernel's
    # gradients already have: no .to() (2 x ~1 us).
    return (
        dx if needs[0] else None,
        dweight if needs[1] and w_np is not None else None,
        dbias if needs[2] and ctx.has_bias else None,
        None,
        None,
    )


_train_eager_backward_once = once_differentiable(_train_eager_backward)


def _forward_views(x_np: Any, eps: float, arrays: Any):  # type: ignore[no-untyped-def]
    """The training kernel on x's NumPy view with the module's views (``nn._views.Views``),
    updating its running buffers: ``(y, mean, var, invstd)`` as NumPy arrays, the statistics
    in float64 for the backward (``kernels.forward_train``'s ``stats64``)."""
    return _torch_ops.cpu_kernels.forward_train(
        x_np, arrays.weight, arrays.bias, eps, running=arrays.running, stats64=True
    )


class _TrainEager(torch.autograd.Function):
    """The modules' eager training forward on CPU float32/float64: y only, the running buffers
    updated inside the kernel call.

    One output instead of four (each output is an autograd edge to set up), and no statistics
    handed back for a separate running-average update.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, arrays):  # type: ignore[override]
        x_np = x.numpy(force=True)
        y, mean, _, invstd = _forward_views(x_np, eps, arrays)
        ctx.save_for_backward(x, weight)
        # The statistics stay NumPy arrays for the backward kernel (no tensor round trip), in
        # float64: x_hat formed from a float32-rounded mean is off by up to ~6e-8 * |mean| / std.
        ctx.arrays = (x_np, arrays.weight, mean, invstd)
        ctx.has_bias = bias is not None
        return torch.from_numpy(y)

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        # once_differentiable's no_grad block (~1 us) only matters under create_graph=True,
        # the one case where grad mode is on here; it then makes double backward raise.
        if torch.is_grad_enabled():
            return _train_eager_backward_once(ctx, dy)
        return _train_eager_backward(ctx, dy)


_TRAIN_EAGER_APPLY = super(torch.autograd.Function, _TrainEager).apply


def train_eager(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, arrays: Any) -> Tensor:
    """y for a plain CPU float32/float64 x in eager mode. ``arrays`` (``nn._views.Views``) holds
    NumPy views of weight and bias in x's dtype, and ``running`` (``kernels.forward_train``'s,
    or None), which is updated in the same kernel call.

    The caller (``BatchNormBase``'s fast path) has checked everything ``check_args`` checks.
    """
    if not _needs_grad(x, weight, bias):
        return torch.from_numpy(_forward_views(x.numpy(force=True), eps, arrays)[0])
    if torch._C._are_functorch_transforms_active():
        return _TrainEager.apply(x, weight, bias, eps, arrays)
    return _TRAIN_EAGER_APPLY(x, weight, bias, eps, arrays)


def _triton_kernels():  # type: ignore[no-untyped-def]
    from batchnorm.kernels import triton as gpu_kernels  # triton is optional: imported on first use

    return gpu_kernels


def triton_eager(x: Tensor) -> bool:
    """True when ``train_triton`` applies: a plain CUDA tensor (or a CPU one under
    ``BATCHNORM_BACKEND=triton``) in eager mode, contiguous or channels-last."""
    return (
        type(x) is torch.Tensor
        and (x.is_cuda or (x.is_cpu and _torch_ops.triton_on_cpu()))
        and _standard_layout(x)
        and not _tracing()
        and not torch._C._are_functorch_transforms_active()
    )


def _train_triton_backward(ctx, dy):  # type: ignore[no-untyped-def]
    x, weight, mean, invstd = ctx.saved_tensors
    dx, dweight, dbias = _triton_kernels().backward(dy, x, mean, invstd, weight)
    needs = ctx.needs_input_grad
    weight_dtype, bias_dtype = ctx.param_dtypes
    return (
        dx if needs[0] else None,
        dweight.to(weight_dtype) if needs[1] else None,
        dbias.to(bias_dtype) if needs[2] else None,
        None,
        None,
    )


_train_triton_backward_once = once_differentiable(_train_triton_backward)


class _TrainTriton(torch.autograd.Function):
    """The eager training forward on the Triton kernels: y only, running buffers updated inside
    the kernels. One output and no running-average torch ops: on an H100 host the general path
    (``forward_train`` + four in-place torch ops) cost ~200 us of host time per forward."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, running):  # type: ignore[override]
        y, mean, _, invstd = _triton_kernels().forward_train(x, weight, bias, eps, running=running)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.param_dtypes = (None if weight is None else weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        if torch.is_grad_enabled():  # create_graph=True: double backward must raise
            return _train_triton_backward_once(ctx, dy)
        return _train_triton_backward(ctx, dy)


_TRAIN_TRITON_APPLY = super(torch.autograd.Function, _TrainTriton).apply


def train_triton(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, running: tuple | None
) -> Tensor:
    """Training forward for a ``triton_eager`` x; ``running = (running_mean, running_var,
    momentum)`` or None. The caller has run ``functional.check_args``."""
    if not _needs_grad(x, weight, bias):
        return _triton_kernels().forward_train(x, weight, bias, eps, running=running)[0]
    return _TRAIN_TRITON_APPLY(x, weight, bias, eps, running)
