"""``batch_norm`` with ``torch.nn.functional.batch_norm``'s signature, for torch tensors and NumPy arrays.

Training mode (``training=True``) normalizes with the batch's statistics, per channel over the
``m = N * prod(spatial)`` values of every axis but axis 1::

    mean   = 1/m * sum_i x_i
    var    = 1/m * sum_i (x_i - mean)^2                  (biased: what the normalization uses)
    y      = weight * (x - mean) / sqrt(var + eps) + bias

and, when running buffers are given, updates them in place with torch's momentum convention
and the *unbiased* variance (Keras and Flax weight the old value by ``momentum`` instead)::

    running_mean <- (1 - momentum) * running_mean + momentum * mean
    running_var  <- (1 - momentum) * running_var  + momentum * var * m / (m - 1)

Prediction mode (``training=False``) uses the running estimates instead of the batch's::

    y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

Torch tensors run as one ``torch.library`` op (``batchnorm::forward_train`` /
``forward_inference``, see ``batchnorm._custom_ops``) with autograd for input, weight and bias,
visible to torch.compile and torch.export as a single node. NumPy arrays run the same kernels
without importing torch and without autograd.

Shape:
    input, output: ``(N, C)`` or ``(N, C, *spatial)``, any strides (output keeps the layout);
    running_mean, running_var, weight, bias: ``(C,)``.
"""

from __future__ import annotations

import sys
from typing import Any, TypeVar, cast

import numpy as np

from batchnorm import reference

__all__ = ["batch_norm"]

ArrayT = TypeVar("ArrayT")

_LOW_PRECISION = ("float16", "bfloat16")


def batch_norm(
    input: ArrayT,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None = None,
    bias: Any | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> ArrayT:
    """Batch normalization of ``input`` (a ``torch.Tensor`` or a ``numpy.ndarray``).

    Same arguments and semantics as ``torch.nn.functional.batch_norm`` (formulas in the module
    docstring). ``running_mean``/``running_var`` may be ``None`` in training (no update); they
    are required in prediction. ``momentum`` is the weight of the new batch; the cumulative
    average of ``momentum=None`` needs the batch count, which only a module has, so here it
    must be a number when running buffers are updated (the modules pass
    ``1 / num_batches_tracked``).

    Differences from torch, on purpose: invalid input raises ValueError/TypeError naming the
    argument before anything is computed or updated (torch raises RuntimeError from inside its
    kernel); an empty batch returns an empty output and leaves the running buffers alone; in
    training ``eps`` must be > 0 (a constant channel would otherwise divide by zero).

    Shape:
        input, output: ``(N, C, *spatial)``; running_mean, running_var, weight, bias: ``(C,)``.
    """
    return _batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _batch_norm(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    training: bool,
    momentum: float | None,
    eps: float,
    where: str = "batch_norm",
) -> Any:
    """``batch_norm`` with ``where`` (a module's class name) prefixed to every error message."""
    is_torch = _is_torch(input)
    if not is_torch and not isinstance(input, np.ndarray):
        raise TypeError(
            f"{where}: input must be a torch.Tensor or a numpy.ndarray, got {type(input).__name__}; "
            "wrap it with np.asarray(...) or torch.as_tensor(...)"
        )
    if is_torch and not training and _exporting():
        import torch

        # Exporters (torch.export, ONNX) know aten.batch_norm and lower it to the standard
        # BatchNormalization node that runtimes and fusers understand; our custom op would be
        # an opaque node no runtime can execute. The legacy ONNX exporter traces with
        # torch.jit, where every shape comparison in check_args is a TracerWarning; torch's
        # own op checks its arguments there.
        if not torch.jit.is_tracing():
            check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, where=where)
        return torch.nn.functional.batch_norm(input, running_mean, running_var, weight, bias, False, 0.0, eps)
    check_args(input, running_mean, running_var, weight, bias, training, momentum, eps, where=where)
    if is_torch:
        return _batch_norm_torch(input, running_mean, running_var, weight, bias, training, momentum, eps)
    return _batch_norm_numpy(input, running_mean, running_var, weight, bias, training, momentum, eps)


def _is_torch(value: Any) -> bool:
    # torch not imported means value cannot be a tensor: keeps the NumPy path torch-free
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _is_float(dtype: Any) -> bool:
    if isinstance(dtype, np.dtype):
        return bool(np.issubdtype(dtype, np.floating))
    return bool(dtype.is_floating_point)


def count_per_channel(shape: tuple[int, ...]) -> int:
    """``m = N * prod(spatial)``: how many values each channel's statistics are taken over."""
    count = shape[0]
    for size in shape[2:]:
        count *= size
    return count


def check_args(
    input: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    training: bool,
    momentum: float | None,
    eps: float,
    where: str = "batch_norm",
) -> None:
    """Raise ValueError/TypeError, naming the argument, for anything ``batch_norm`` cannot run.

    Checks input dtype (floating), ndim (>= 2), the ``(C,)`` shape, dtype and device of every
    per-channel tensor, running buffers present in prediction, ``eps > 0`` and more than one
    value per channel in training, and a numeric ``momentum`` when buffers are updated.
    Variants call it before touching any state.
    """
    shape = tuple(input.shape)
    if not _is_float(input.dtype):
        raise TypeError(
            f"{where}: input must be floating point (float16, bfloat16, float32 or float64), got "
            f"{_dtype_name(input.dtype)}; convert it first, e.g. x.float() or x.astype(np.float32)"
        )
    if input.ndim < 2:
        raise ValueError(
            f"{where}: input must be (N, C) or (N, C, *spatial) with channels on axis 1, got "
            f"{input.ndim}-D with shape {shape}; add a batch axis, e.g. x[None] or x.unsqueeze(0)"
        )
    channels = shape[1]
    input_is_torch = _is_torch(input)
    input_dtype = _dtype_name(input.dtype)
    for name, value in (
        ("weight", weight),
        ("bias", bias),
        ("running_mean", running_mean),
        ("running_var", running_var),
    ):
        if value is None:
            continue
        if input_is_torch and _is_torch(value):
            # The common case decided in ~0.3 us per tensor: each module call comes through here
            # (check_args took ~5 us of a (64, 16) forward before).
            if value.shape == (channels,) and value.dtype == input.dtype and value.device == input.device:
                continue
        if _is_torch(value) != input_is_torch:
            raise TypeError(
                f"{where}: {name} is a {type(value).__name__} but input is a {type(input).__name__}; "
                "pass all arrays as torch tensors or all as NumPy arrays"
            )
        if tuple(value.shape) != (channels,):
            raise ValueError(
                f"{where}: {name} must have shape (C,) = ({channels},) to match the channels of "
                f"input (axis 1 of shape {shape}), got shape {tuple(value.shape)}; the layer was "
                f"probably built for {value.shape[0] if value.ndim == 1 else '?'} features: set "
                f"num_features={channels} or check the previous layer's output channels"
            )
        dtype = _dtype_name(value.dtype)
        if dtype != input_dtype and not (input_dtype in _LOW_PRECISION and dtype == "float32"):
            raise TypeError(
                f"{where}: {name} has dtype {dtype} but input has {input_dtype}; parameters and "
                "running statistics must have the input's dtype (float32 ones are also accepted "
                "for float16/bfloat16 input); cast the module with .to(dtype) or the input"
            )
        device = getattr(value, "device", None)
        if device is not None and device != input.device:
            raise ValueError(
                f"{where}: {name} is on {device} but input is on {input.device}; move the module "
                f"or the input, e.g. module.to({str(input.device)!r})"
            )
    if not training and (running_mean is None or running_var is None):
        raise ValueError(
            f"{where}: running_mean and running_var are required when training=False (prediction "
            "normalizes with the running estimates), got None; pass them or use training=True"
        )
    if not training:
        return
    if not eps > 0:
        raise ValueError(
            f"{where}: eps must be > 0 in training, got eps={eps!r}; a constant channel has batch "
            "variance 0 and would be divided by sqrt(0 + eps). The usual value is 1e-5"
        )
    count = count_per_channel(shape)
    if count == 1:
        raise ValueError(
            f"{where}: Expected more than 1 value per channel when training, got input size "
            f"{shape}: the batch variance of a single value is 0, so the output would be just "
            "bias. Likely fixes: drop_last=True in the DataLoader (the last batch had one sample), "
            "model.eval() for prediction, or a frozen BN (batchnorm.freeze) when fine-tuning with "
            "batch size 1"
        )
    if (running_mean is not None or running_var is not None) and momentum is None:
        raise TypeError(
            f"{where}: momentum=None (a cumulative average) needs the number of batches seen, "
            "which only a module tracks; pass momentum=1/num_batches_tracked, or use "
            "batchnorm.nn.BatchNorm*d(momentum=None)"
        )


def _batch_norm_numpy(
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    training: bool,
    momentum: float | None,
    eps: float,
) -> np.ndarray:
    from batchnorm import kernels

    compute = np.float64 if x.dtype == np.float64 else np.float32
    weight = None if weight is None else np.asarray(weight, compute)
    bias = None if bias is None else np.asarray(bias, compute)
    count = count_per_channel(x.shape)
    if count == 0:
        return np.empty_like(x)
    if not training:
        invstd = (1.0 / np.sqrt(np.asarray(running_var, np.float64) + eps)).astype(compute)
        return kernels.normalize(x, np.asarray(running_mean, compute), invstd, weight, bias)
    y, mean, var, _ = kernels.forward_train(x, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        factor = cast(float, momentum)  # check_args rejected None when buffers are given
        new_mean, new_var = reference.update_running(running_mean, running_var, mean, var, count, factor)
        running_mean[...] = new_mean
        running_var[...] = new_var
    return y


def _batch_norm_torch(
    x: Any,
    running_mean: Any,
    running_var: Any,
    weight: Any,
    bias: Any,
    training: bool,
    momentum: float | None,
    eps: float,
) -> Any:

    from batchnorm import _custom_ops, _torch_ops

    count = count_per_channel(tuple(x.shape))
    if count == 0:
        return _empty_output(x, weight, bias)
    if _torch_ops.torch_kernel_route(x) and not _custom_ops._tracing():
        import torch

        # torch's own CUDA kernel where it is the faster one (see _torch_ops.CUDA_TRITON_MIN_COUNT);
        # same semantics, the arguments already checked here.
        return torch.nn.functional.batch_norm(
            x, running_mean, running_var, weight, bias, training, momentum or 0.0, eps
        )
    if not training:
        return _custom_ops.batch_norm_inference(x, running_mean, running_var, weight, bias, eps)
    if _custom_ops.triton_eager(x) and _updatable_in_place(running_mean, running_var):
        tracks = running_mean is not None and running_var is not None
        running = (running_mean, running_var, momentum) if tracks else None
        return _custom_ops.train_triton(x, weight, bias, eps, running)
    y, mean, var, _ = _custom_ops.batch_norm_train(x, weight, bias, eps)
    if running_mean is not None and running_var is not None:
        # float64 statistics from the CPU kernels, rounded to the buffers' dtype as torch's are
        mean, var = mean.to(running_mean.dtype), var.to(running_var.dtype)
        update_running_(running_mean, running_var, mean, var, count, cast(float, momentum))
    return y


def _updatable_in_place(running_mean: Any, running_var: Any) -> bool:
    """Whether the Triton kernels can update these running buffers in place (or there are none);
    the general path handles any others."""
    if running_mean is None or running_var is None:
        return True
    return not (running_mean.requires_grad or running_var.requires_grad) and (
        running_mean.is_contiguous() and running_var.is_contiguous()
    )


def update_running_(
    running_mean: Any, running_var: Any, mean: Any, var: Any, count: int, momentum: float
) -> None:
    """Update torch running buffers in place from a batch's biased ``mean``/``var`` over ``count`` values.

    ``running <- (1 - momentum) * running + momentum * batch``, with Bessel's correction
    ``var * count / (count - 1)`` on the variance. No autograd; dtypes follow the buffers.
    """
    import torch

    from batchnorm._custom_ops import _tracing

    if (
        type(running_mean) is type(running_var) is type(mean) is type(var) is torch.Tensor
        and running_mean.device.type == "cpu"
        and not _tracing()
        and not running_mean.requires_grad
        and not running_var.requires_grad
        and mean.dtype == running_mean.dtype == running_var.dtype == var.dtype
    ):
        # One compiled call on the buffers' memory: 4 in-place torch ops cost ~8 us on (16,)
        # buffers, six NumPy ops ~3.3 us, this ~1 us (bit-identical to the NumPy ops). (The
        # buffers' autograd version counter is not bumped; nothing saves them.)
        from batchnorm.kernels._dispatch import update_running_ as update_arrays

        update_arrays(
            running_mean.numpy(),
            running_var.numpy(),
            mean.detach().numpy(),
            var.detach().numpy(),
            count,
            momentum,
        )
        return
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(mean, alpha=momentum)
        # Bessel's correction folded into the weight: the batch var is biased, the estimate not
        running_var.mul_(1.0 - momentum).add_(var, alpha=momentum * count / (count - 1))


def _empty_output(x: Any, weight: Any, bias: Any) -> Any:
    # Same graph as y = x * weight + bias over zero elements, so every input that requires
    # grad gets a (zero) gradient; the kernels never see an empty tensor.
    view = (1, -1) + (1,) * (x.ndim - 2)
    y = x.clone()
    if weight is not None:
        y = y * weight.to(x.dtype).view(view)
    if bias is not None:
        y = y + bias.to(x.dtype).view(view)
    return y


def _exporting() -> bool:
    import torch

    if torch.compiler.is_exporting():
        return True
    return bool(torch.onnx.is_in_onnx_export())
