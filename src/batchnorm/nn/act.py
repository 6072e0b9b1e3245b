"""Batch norm fused with its activation: ``BatchNormAct1d`` and ``BatchNormAct2d``.

.. math::

    y = \\mathrm{act}(\\gamma (x - \\mathrm{E}[x]) / \\sqrt{\\mathrm{Var}[x] + \\epsilon} + \\beta)

with ``act`` one of ``identity``, ``relu``, ``leaky_relu`` (``negative_slope``) and ``silu``.
The forward reads x for the statistics and once more to write y; the backward reads x and dy
for its two sums and once more to write dx: the activation and its derivative cost no extra
pass over memory (``kernels/act.py``).

``save_memory=True`` keeps only the output y for backward (InPlace-ABN, Rota Bulo et al.
2018): ``z = act^-1(y)`` and ``x_hat = (z - beta) / gamma``. The next layer usually keeps y
anyway, so a BN + activation pair then holds no activation memory of its own. Only invertible
activations (identity, leaky_relu with slope > 0) qualify, and every gamma must be nonzero.
Because y is saved, modifying it in place before backward is an error (torch reports it).

Statistics and running estimates are exactly those of ``torch.nn.BatchNorm*d``: biased batch
variance for normalization, unbiased for ``running_var``, ``running <- (1 - momentum) running +
momentum batch`` (``momentum=None``: cumulative average); the state_dict is BatchNorm's, so
checkpoints move between the two.

CPU tensors run the numba kernels (``kernels/_act_dispatch.py``); CUDA tensors, and CPU ones
under ``BATCHNORM_BACKEND=triton``, run the fused Triton kernels (``batchnorm.kernels.triton``),
chosen by ``batchnorm._torch_ops``'s device rule. Eval mode while autograd is recording
(fine-tuning through frozen statistics) runs ``torch.nn.functional.batch_norm`` and the
activation, where the fused kernel would save nothing.

The functions ``forward_train_act``, ``normalize_act``, ``backward_act``, and the backward's
two passes ``backward_reduce_act`` / ``backward_dx_act`` are that device dispatch on torch
tensors (SyncBatchNormAct reduces the sums across processes between the two passes).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from batchnorm import _custom_ops, _torch_ops
from batchnorm._torch_ops import _compute_dtype
from batchnorm._torch_ops import _from_numpy as _tensor
from batchnorm._torch_ops import _np_as as _numpy
from batchnorm.kernels import _act_dispatch as _kernels
from batchnorm.kernels._dispatch import update_running
from batchnorm.kernels._dispatch import update_running_ as update_running_arrays
from batchnorm.nn.batchnorm import BatchNormBase, _fast_class, torch_bias_kwarg

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "batch_norm_act"]

ACTIVATIONS = tuple(_kernels.ACTIVATIONS)
_NUMPY_DTYPES = (torch.float32, torch.float64)


def _numpy_stat(t: Tensor) -> Any:
    """A running buffer as NumPy, without a copy when NumPy has its dtype."""
    t = t.detach()
    return t.numpy() if t.dtype in _NUMPY_DTYPES else t.to(torch.float64).numpy()


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def forward_train_act(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, act: str, slope: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, var, invstd)``: batch statistics (biased var), ``y = act(gamma x_hat + beta)``.

    Shape:
        x, y: ``(N, C, *spatial)``; the rest ``(C,)`` in the compute dtype.
    """
    gpu = _torch_ops._backend(x)
    if gpu is not None:
        return gpu.forward_train_act(x, weight, bias, eps, act, slope)
    cd = _compute_dtype(x)
    y, mean, var, invstd = _kernels.forward_train(
        _numpy(x, cd), _numpy(weight, cd), _numpy(bias, cd), eps, act, slope
    )
    return _tensor(y, x.dtype), torch.from_numpy(mean), torch.from_numpy(var), torch.from_numpy(invstd)


def normalize_act(
    x: Tensor,
    mean: Tensor,
    invstd: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    act: str,
    slope: float,
) -> Tensor:
    """``y = act(gamma (x - mean) invstd + beta)`` in one pass.

    Shape:
        x, y: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    gpu = _torch_ops._backend(x)
    if gpu is not None:
        return gpu.normalize_act(x, mean, invstd, weight, bias, act, slope)
    cd = _compute_dtype(x)
    y = _kernels.normalize_act(
        _numpy(x, cd), _numpy(mean, torch.float64), _numpy(invstd, torch.float64),
        _numpy(weight, cd), _numpy(bias, cd), act, slope,
    )  # fmt: skip
    return _tensor(y, x.dtype)


def backward_act(
    dy: Tensor, saved: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, slope: float, from_output: bool,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """``(dx, dgamma, dbeta)``; ``saved`` is x, or y when ``from_output`` (module docstring).

    Shape:
        dy, saved, dx: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    gpu = _torch_ops._backend(saved)
    if gpu is not None:
        return gpu.backward_act(dy, saved, mean, invstd, weight, bias, act, slope, from_output)
    cd = _compute_dtype(saved)
    dx, dgamma, dbeta = _kernels.backward(
        _numpy(dy, cd), _numpy(saved, cd), _numpy(mean, cd), _numpy(invstd, cd),
        _numpy(weight, cd), _numpy(bias, cd), act, slope, from_output,
    )  # fmt: skip
    return _tensor(dx, saved.dtype), torch.from_numpy(dgamma), torch.from_numpy(dbeta)


def backward_reduce_act(
    dy: Tensor, saved: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, slope: float, from_output: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The backward's first pass: local ``(sum dz, sum dz x_hat)``, ``dz = dy act'(z)``.

    Shape:
        dy, saved: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    gpu = _torch_ops._backend(saved)
    if gpu is not None:
        return gpu.backward_reduce_act(dy, saved, mean, invstd, weight, bias, act, slope, from_output)
    cd = _compute_dtype(saved)
    sums = _kernels.backward_reduce_act(
        _numpy(dy, cd), _numpy(saved, cd), _numpy(mean, cd), _numpy(invstd, cd),
        _numpy(weight, cd), _numpy(bias, cd), act, slope, from_output,
    )  # fmt: skip
    return torch.from_numpy(sums[0]), torch.from_numpy(sums[1])


def backward_dx_act(
    dy: Tensor, saved: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, bias: Tensor | None,
    act: str, slope: float, from_output: bool, sum_dz: Tensor, sum_dz_xhat: Tensor, count: int,
) -> Tensor:  # fmt: skip
    """The backward's second pass: ``dx = gamma invstd (dz - sum_dz / count - x_hat sum_dz_xhat / count)``.

    Shape:
        dy, saved, dx: ``(N, C, *spatial)``; the rest ``(C,)``.
    """
    gpu = _torch_ops._backend(saved)
    if gpu is not None:
        return gpu.backward_dx_act(
            dy, saved, mean, invstd, weight, bias, act, slope, from_output, sum_dz, sum_dz_xhat, count
        )
    cd = _compute_dtype(saved)
    dx = _kernels.backward_dx_act(
        _numpy(dy, cd), _numpy(saved, cd), _numpy(mean, cd), _numpy(invstd, cd),
        _numpy(weight, cd), _numpy(bias, cd), act, slope, from_output,
        _numpy(sum_dz, torch.float64), _numpy(sum_dz_xhat, torch.float64), count,
    )  # fmt: skip
    return _tensor(dx, saved.dtype)


def _forward_train(x: Tensor, weight, bias, eps: float, act: str, slope: float, params=None):  # type: ignore[no-untyped-def]
    """``(y, mean, var, invstd, arrays)``: on the numba path the statistics are float64 NumPy
    arrays (they go straight back to the kernels: no tensor round trip, no rounding of the
    mean that x_hat is formed from; see ``kernels.forward_train``) and ``arrays`` holds the
    views of x, weight and bias for the backward when x is float32/float64 (else ``()``);
    on Triton the statistics are tensors and ``arrays`` is None. ``params``: NumPy views of
    weight and bias in x's dtype the caller already has (the module's fast path), or None."""
    gpu = _torch_ops._backend(x)
    if gpu is not None:
        return (*gpu.forward_train_act(x, weight, bias, eps, act, slope), None)
    if x.dtype in _NUMPY_DTYPES:
        d = x.dtype
        if params is None:
            params = (_numpy(weight, d), _numpy(bias, d))
        arrays = (_torch_ops._np(x), *params)
        y, mean, var, invstd = _kernels.forward_train(*arrays, eps, act, slope, stats64=True)
        return torch.from_numpy(y), mean, var, invstd, arrays
    cd = _compute_dtype(x)
    y, mean, var, invstd = _kernels.forward_train(
        _numpy(x, cd), _numpy(weight, cd), _numpy(bias, cd), eps, act, slope, stats64=True
    )
    return _tensor(y, x.dtype), mean, var, invstd, ()


def _backward(ctx, dy):  # type: ignore[no-untyped-def]
    saved, weight, bias = ctx.saved_tensors  # (raises if one was modified in place since)
    (mean, invstd), (act, slope, from_output), arrays = ctx.stats, ctx.config, ctx.arrays
    if arrays is None:
        dx, dweight, dbias = backward_act(dy, saved, mean, invstd, weight, bias, act, slope, from_output)
    else:
        cd = _compute_dtype(saved)
        if not arrays:  # float16/bfloat16: views in the compute dtype now (not kept since the forward)
            arrays = (_numpy(saved, cd), _numpy(weight, cd), _numpy(bias, cd))
        saved_np, weight_np, bias_np = arrays
        dx, dweight, dbias = _kernels.backward(
            _numpy(dy, cd), saved_np, mean, invstd, weight_np, bias_np, act, slope, from_output
        )
        dx, dweight, dbias = _tensor(dx, saved.dtype), torch.from_numpy(dweight), torch.from_numpy(dbias)
    need = ctx.needs_input_grad
    dx = dx if need[0] else None
    dweight = _cast(dweight, weight.dtype) if weight is not None and need[1] else None
    dbias = _cast(dbias, bias.dtype) if bias is not None and need[2] else None
    return dx, dweight, dbias, None, None, None, None, None, None


_backward_once = once_differentiable(_backward)


class _BatchNormActFunction(torch.autograd.Function):
    """Training-mode BN + activation on the kernels; returns y and appends ``(mean, var)`` to
    ``stats`` (one autograd output instead of three: each output is an edge to set up).

    On the numba path the backward reads the NumPy views the forward made (x or y, weight,
    bias) instead of converting the saved tensors again, and skips once_differentiable's
    no_grad block when grad mode is off. (64, 16) BatchNormAct1d module forward+backward,
    interleaved against the previous code (whose counter increment also cost more, see
    ``kernels._dispatch.update_running``): 140 -> 119 us (torch BatchNorm1d + ReLU: 98 us).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, act, slope, save_memory, stats, params):  # type: ignore[override]
        y, mean, var, invstd, arrays = _forward_train(x, weight, bias, eps, act, slope, params)
        stats += (mean, var)
        ctx.save_for_backward(y if save_memory else x, weight, bias)
        if arrays and save_memory:
            arrays = (y.numpy(), *arrays[1:])
        ctx.arrays = arrays
        ctx.stats = (mean, invstd)
        ctx.config = (act, slope, save_memory)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        # once_differentiable (a no_grad block; double backward raises) only matters under
        # create_graph=True, the one case where grad mode is on here
        if torch.is_grad_enabled():
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


# ``Function.apply`` is a Python wrapper (argument binding, functorch unwrapping) around the C++
# apply that outside functorch transforms only forwards the arguments; the C++ apply directly
# saves ~2.5 us a call (the same choice as batchnorm._custom_ops).
_APPLY = super(torch.autograd.Function, _BatchNormActFunction).apply


def _train(x: Tensor, weight, bias, eps: float, act: str, slope: float, save_memory: bool, params=None):  # type: ignore[no-untyped-def]
    """``(y, mean, var)``: through the autograd Function only when a gradient can flow.
    ``params``: as ``_forward_train``'s."""
    needs_graph = torch.is_grad_enabled() and (
        x.requires_grad
        or (weight is not None and weight.requires_grad)
        or (bias is not None and bias.requires_grad)
    )
    if not needs_graph and not torch.jit.is_tracing():
        y, mean, var, _, _ = _forward_train(x, weight, bias, eps, act, slope, params)
        return y, mean, var
    stats: list = []
    if torch._C._are_functorch_transforms_active():
        y = _BatchNormActFunction.apply(x, weight, bias, eps, act, slope, save_memory, stats, params)
    else:
        y = _APPLY(x, weight, bias, eps, act, slope, save_memory, stats, params)
    return y, stats[0], stats[1]


def _activate(z: Tensor, act: str, slope: float) -> Tensor:
    if act == "relu":
        return F.relu(z)
    if act == "leaky_relu":
        return F.leaky_relu(z, slope)
    if act == "silu":
        return F.silu(z)
    return z


def _update_running(
    running_mean: Tensor, running_var: Tensor, mean: Any, var: Any, count: int, momentum: float
) -> None:
    """``running <- (1 - momentum) running + momentum batch``, var with Bessel's correction;
    ``mean``/``var`` are NumPy arrays (numba path) or tensors (Triton path)."""
    if (
        isinstance(mean, np.ndarray)
        and running_mean.dtype in _NUMPY_DTYPES
        and running_var.dtype in _NUMPY_DTYPES
    ):
        # one kernel call on the buffers' memory: the four torch ops cost ~10 us here
        rm, rv = running_mean.numpy(), running_var.numpy()
        if mean.dtype != rm.dtype:  # float64 batch statistics, rounded as torch's are
            mean, var = mean.astype(rm.dtype), var.astype(rm.dtype)
        update_running_arrays(rm, rv, mean, var, count, momentum)
        return
    mean, var = torch.as_tensor(mean), torch.as_tensor(var)
    with torch.no_grad():
        running_mean.mul_(1.0 - momentum).add_(mean.to(running_mean), alpha=momentum)
        running_var.mul_(1.0 - momentum).add_(var.to(running_var), alpha=momentum * count / (count - 1))


def batch_norm_act(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    act: str = "relu",
    negative_slope: float = 0.01,
    save_memory: bool = False,
) -> Tensor:
    """``act(F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps))``.

    Same arguments and running-statistics update as ``torch.nn.functional.batch_norm``
    (``momentum`` is the weight of the new batch), fused on CPU and CUDA. ``save_memory``
    keeps only the output for backward (identity and leaky_relu only).

    Shape:
        x, output: ``(N, C, *spatial)``; running stats, weight, bias: ``(C,)``.
    """
    _kernels._act_code(act, negative_slope)
    if save_memory:
        _check_save_memory(act, negative_slope, weight)
    return _batch_norm_act(
        x, running_mean, running_var, weight, bias, training, momentum, eps, act, negative_slope, save_memory
    )


def _inference_numba(
    x: Tensor, running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
    eps: float, act: str, slope: float, arrays=None,
) -> Tensor:  # fmt: skip
    """Prediction on the numba kernels, all in NumPy on the buffers' memory: the torch ops for
    invstd and the casts would cost more than the kernel on small inputs. ``arrays``: the
    module's ``nn._views.Views`` of the four tensors (in x's dtype), or None to convert them."""
    cd = _compute_dtype(x)
    if arrays is None:
        params = (_numpy(weight, cd), _numpy(bias, cd), _numpy_stat(running_mean), _numpy_stat(running_var))
    else:
        params = (arrays.weight, arrays.bias, arrays.running_mean, arrays.running_var)
    y = _kernels.forward_inference(_numpy(x, cd), *params, eps, act, slope)
    return _tensor(y, x.dtype)


def _batch_norm_act(
    x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
    bias: Tensor | None, training: bool, momentum: float, eps: float, act: str, negative_slope: float,
    save_memory: bool,
) -> Tensor:  # fmt: skip
    """``batch_norm_act`` after its argument checks (the module makes them once, itself)."""
    if not training:
        if running_mean is None or running_var is None:
            raise ValueError(
                "running_mean/running_var: required when training=False, got None; "
                "pass training=True to use batch statistics"
            )
        recording = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (x, weight, bias)
        )
        if recording:
            z = F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)
            return _activate(z, act, negative_slope)
        if x.numel() == 0:
            return x.clone()
        if _torch_ops.torch_kernel_route(x):
            return _activate(F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps), act,
                             negative_slope)  # fmt: skip
        gpu = _torch_ops._backend(x)
        if gpu is not None:
            return gpu.forward_inference_act(
                x, weight, bias, running_mean, running_var, eps, act, negative_slope
            )
        return _inference_numba(x, running_mean, running_var, weight, bias, eps, act, negative_slope)
    if x.numel() == 0:  # an empty batch: nothing to normalize, no statistics to update
        return _activate(x * 1.0, act, negative_slope)
    count = x.numel() // max(1, x.shape[1])
    if count <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}; "
            "use a batch of at least 2 samples, or eval mode"
        )
    if not save_memory and _torch_ops.torch_kernel_route(x) and not _custom_ops._tracing():
        # torch's CUDA batch norm where it measured faster than the Triton kernels (see
        # _torch_ops.CUDA_TRITON_MIN_COUNT), then the activation: two kernels, not one
        z = F.batch_norm(x, running_mean, running_var, weight, bias, True, momentum, eps)
        return _activate(z, act, negative_slope)
    y, mean, var = _train(x, weight, bias, eps, act, negative_slope, save_memory)
    if running_mean is not None and running_var is not None:
        # Bessel's correction: the running estimate is of the population variance.
        _update_running(running_mean, running_var, mean, var, count, momentum)
    return y


def _check_save_memory(act: str, slope: float, weight: Tensor | None) -> None:
    if act not in _kernels.INVERTIBLE:
        raise ValueError(
            f"save_memory=True: x_hat is recovered from the output only for invertible activations "
            f"{_kernels.INVERTIBLE}, got act={act!r}; use save_memory=False, or act='leaky_relu'"
        )
    if act == "leaky_relu" and slope <= 0:
        raise ValueError(f"save_memory=True: negative_slope must be > 0 to invert leaky_relu, got {slope}")
    if weight is not None and bool((weight == 0).any()):
        zeros = torch.nonzero(weight == 0).flatten()[:8].tolist()
        raise ValueError(
            f"save_memory=True: recovering x_hat divides by weight (gamma), which is 0 at channels "
            f"{zeros}; use save_memory=False or reinitialise those weights"
        )


class _BatchNormActMixin(BatchNormBase):
    """BatchNorm's checks, parameters, buffers and state_dict (``BatchNormBase``), plus an
    activation fused into the kernels."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        act: str = "relu",
        negative_slope: float = 0.01,
        save_memory: bool = False,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
    ) -> None:
        _kernels._act_code(act, negative_slope)
        if save_memory:
            _check_save_memory(act, negative_slope, None)
        torch_base = torch_bias_kwarg(bias, type(self).__name__)
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **torch_base
        )  # type: ignore[call-arg]
        self.act = act
        self.negative_slope = negative_slope
        self.save_memory = save_memory

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", act={self.act!r}"  # type: ignore[misc]
        if self.act == "leaky_relu":
            text += f", negative_slope={self.negative_slope}"
        return text + (", save_memory=True" if self.save_memory else "")

    def forward(self, input: Tensor) -> Tensor:  # noqa: A002 - torch's argument name
        if not self.save_memory and type(input) is Tensor and _fast_class(type(self)):
            # BatchNormBase's checks and running-statistics update around this class's
            # kernels (_fast_train, _fast_eval): (256, 1024) float32 module forward 213 -> ~150
            # us; save_memory takes the general path (its gamma check is a torch op).
            y = self._forward_fast(input)
            if y is not None:
                return y
        self._check_input(input)
        use_batch_stats = self._use_batch_stats()
        save_memory = self.save_memory and use_batch_stats
        if save_memory:
            _check_save_memory(self.act, self.negative_slope, self.weight)
        tracks = self._tracks_this_batch()
        running_mean, running_var = self._running_buffers()
        # _check_input made batch_norm_act's argument checks: call its body directly
        y = _batch_norm_act(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            use_batch_stats,
            self._momentum_factor() if tracks else 0.0,
            self.eps,
            self.act,
            self.negative_slope,
            save_memory,
        )
        # counted only once the update has happened, so a raising forward changes nothing
        if tracks and input.numel() > 0:
            self._count_batch()
        return y

    def _fast_train(self, input: Tensor, weight, bias, eps: float, arrays):  # type: ignore[no-untyped-def]
        y, mean, var = _train(
            input, weight, bias, eps, self.act, self.negative_slope, False, (arrays.weight, arrays.bias)
        )
        if arrays.running is not None:
            update_running(arrays.running, mean, var, input.numel() // input.shape[1])
        return y

    def _fast_eval(self, input: Tensor, running_mean, running_var, weight, bias, eps: float, arrays):  # type: ignore[no-untyped-def]
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (input, weight, bias)):
            return None  # recording in eval mode: the general path (torch's batch_norm + act)
        return _inference_numba(
            input, running_mean, running_var, weight, bias, eps, self.act, self.negative_slope, arrays
        )


class BatchNormAct1d(_BatchNormActMixin, nn.BatchNorm1d):
    """``act(BatchNorm1d(x))`` fused, on ``(N, C)`` or ``(N, C, L)`` inputs.

    Args: ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    ``device``, ``dtype`` as ``torch.nn.BatchNorm1d``; ``act`` in
    ``identity | relu | leaky_relu | silu``; ``negative_slope`` for leaky_relu;
    ``save_memory`` keeps only the output for backward (identity, leaky_relu).

    Shape:
        input and output: ``(N, C)`` or ``(N, C, L)``.

    Example::

        >>> import torch, batchnorm.nn
        >>> batchnorm.nn.BatchNormAct1d(16, act="silu")(torch.randn(8, 16)).shape
        torch.Size([8, 16])
    """


class BatchNormAct2d(_BatchNormActMixin, nn.BatchNorm2d):
    """``act(BatchNorm2d(x))`` fused, on ``(N, C, H, W)`` inputs (NCHW or channels-last).

    Args: ``num_features``, ``eps``, ``momentum``, ``affine``, ``track_running_stats``,
    ``device``, ``dtype`` as ``torch.nn.BatchNorm2d``; ``act`` in
    ``identity | relu | leaky_relu | silu``; ``negative_slope`` for leaky_relu;
    ``save_memory`` keeps only the output for backward (identity, leaky_relu).

    Shape:
        input and output: ``(N, C, H, W)``; the output keeps the input's memory format.

    Example::

        >>> import torch, batchnorm.nn
        >>> batchnorm.nn.BatchNormAct2d(16)(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
    """
