"""Drop-in ``torch.nn.BatchNorm1d/2d/3d`` running on the project's kernels.

Each class *subclasses* its torch.nn counterpart, so ``isinstance(m, torch.nn.BatchNorm2d)``
holds and the constructor, parameters (``weight``, ``bias``), buffers (``running_mean``,
``running_var``, ``num_batches_tracked``), state_dict keys, repr and old-checkpoint loading are
torch's own. Only ``forward`` changes: it calls ``batchnorm.functional`` (one custom op)::

    training:    y = weight * (x - mean_B) / sqrt(var_B + eps) + bias     (biased var_B)
                 running <- (1 - momentum) * running + momentum * (mean_B, var_B * m / (m - 1))
    prediction:  y = weight * (x - running_mean) / sqrt(running_var + eps) + bias

``momentum=None`` is a cumulative moving average: the k-th batch gets weight 1/k.
``track_running_stats=False`` normalizes with batch statistics in eval mode too.

``BatchNormBase`` is the shared base for variants (SyncBatchNorm, GhostBN, BatchRenorm,
BatchNormAct, ...): mix it in *before* the torch class, ``class X(BatchNormBase,
torch.nn.BatchNorm2d)``, and reuse its hooks (see its docstring).

Differences from torch.nn, on purpose (all make errors earlier or state safer):

* every bad input raises before any state changes; torch bumps ``num_batches_tracked``
  first and then raises from inside ``F.batch_norm``;
* a channel mismatch is a ValueError naming ``num_features`` (torch: RuntimeError from the
  kernel, or nothing at all when there are neither parameters nor running buffers);
  mismatched dtypes are a TypeError (torch: RuntimeError);
* an empty batch (N = 0) returns an empty output and leaves the statistics and
  ``num_batches_tracked`` alone;
* a state_dict with non-finite or negative running statistics is rejected at load time
  (torch loads it and then predicts NaN).
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from batchnorm import _custom_ops, _torch_ops, functional
from batchnorm.nn import _views

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "torch_bias_kwarg"]

# ndim -> (layout, the torch class for it)
_LAYOUTS: dict[int, tuple[str, str]] = {
    2: ("(N, C)", "BatchNorm1d"),
    3: ("(N, C, L)", "BatchNorm1d"),
    4: ("(N, C, H, W)", "BatchNorm2d"),
    5: ("(N, C, D, H, W)", "BatchNorm3d"),
}
_TORCH_NDIMS: tuple[tuple[type, tuple[int, ...]], ...] = (
    (nn.BatchNorm1d, (2, 3)),
    (nn.BatchNorm2d, (4,)),
    (nn.BatchNorm3d, (5,)),
)


_FAST_DTYPES = (torch.float32, torch.float64)

# torch.nn's batch norms take ``bias=`` from torch 2.13 on (a weight without a bias).
_TORCH_TAKES_BIAS = "bias" in inspect.signature(nn.modules.batchnorm._NormBase.__init__).parameters


def torch_bias_kwarg(bias: bool, where: str) -> dict[str, bool]:
    """``bias=`` for torch.nn's batch-norm constructor: passed only when False, so that a torch
    without the argument (before 2.13, e.g. a CUDA build on a GPU machine) builds the default
    layer, and asks for a newer torch only when a layer without a bias is requested."""
    if bias:
        return {}
    if not _TORCH_TAKES_BIAS:
        raise TypeError(
            f"{where}: bias=False needs torch >= 2.13 (torch.nn's batch norm gained the argument "
            f"there), this is torch {torch.__version__}; upgrade torch or use bias=True"
        )
    return {"bias": False}


try:
    # What torch.onnx.is_in_onnx_export() reads, without its two function-level imports on
    # every call: 1.35 -> 0.1 us per eval module call.
    from torch.onnx._internal.exporter import _flags as _onnx_flags
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS as _ONNX_GLOBALS

    def _in_onnx_export() -> bool:
        return bool(_ONNX_GLOBALS.in_onnx_export or _onnx_flags._is_onnx_exporting)

except ImportError:  # pragma: no cover - another torch layout: the public (slower) query
    _in_onnx_export = torch.onnx.is_in_onnx_export
# Hooks a variant may override; a class that overrides none of them can take the fast path.
_HOOKS = (
    "_input_ndims",
    "_check_input",
    "_check_input_dim",
    "_check_channels",
    "_use_batch_stats",
    "_running_buffers",
    "_tracks_this_batch",
    "_momentum_factor",
    "_count_batch",
    "_update_running_stats",
)
_FAST_CLASSES: dict[type, bool] = {}


def _fast_class(cls: type) -> bool:
    ok = _FAST_CLASSES.get(cls)
    if ok is None:
        ok = _FAST_CLASSES[cls] = all(getattr(cls, h) is getattr(BatchNormBase, h) for h in _HOOKS)
    return ok


class BatchNormBase:
    """Mixin for ``torch.nn.modules.batchnorm._BatchNorm`` subclasses: checks, stats, forward.

    Put it first in the bases: ``class GhostBatchNorm2d(BatchNormBase, nn.BatchNorm2d)``.
    Hooks a variant can call or override:

    * ``_input_ndims`` (class attribute): accepted ``input.ndim`` values; empty means taken
      from the torch base class (1d: 2 or 3, 2d: 4, 3d: 5), any ndim >= 2 when there is none.
    * ``_check_input(input)``: every check ``forward`` makes (ndim, channels, dtypes,
      devices, eps, one value per channel in training), raising ValueError/TypeError before
      any state changes. Call it first in your own ``forward``.
    * ``_use_batch_stats()``: True when the batch's statistics normalize (training, or no
      running buffers at all), exactly torch's ``bn_training``.
    * ``_running_buffers()``: the ``(running_mean, running_var)`` to hand to
      ``functional.batch_norm``: the buffers, or ``(None, None)`` in training without tracking.
    * ``_momentum_factor()``: weight of the *next* batch in the running average
      (``momentum``, or ``1 / (num_batches_tracked + 1)`` for ``momentum=None``); reads only.
    * ``_update_running_stats(mean, var, count)``: from biased batch statistics over
      ``count`` values per channel, applies Bessel's correction and the momentum and bumps
      ``num_batches_tracked``; a no-op unless training with ``track_running_stats`` and
      ``count > 0``. For variants that compute their own statistics (ghost batches, a
      cross-rank all-gather, renorm).
    * ``_load_from_state_dict``: rejects non-finite or negative running statistics, then
      defers to torch (which fills in ``num_batches_tracked`` for old checkpoints).
    """

    _input_ndims: ClassVar[tuple[int, ...]] = ()

    # provided by torch.nn.modules.batchnorm._NormBase
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    training: bool
    weight: Tensor | None
    bias: Tensor | None
    running_mean: Tensor | None
    running_var: Tensor | None
    num_batches_tracked: Tensor | None

    def _expected_ndims(self) -> tuple[int, ...]:
        if self._input_ndims:
            return self._input_ndims
        for torch_class, ndims in _TORCH_NDIMS:
            if isinstance(self, torch_class):
                return ndims
        return ()

    def _check_input_dim(self, input: Tensor) -> None:
        """ndim check (torch's hook name, so torch code calling it gets our message)."""
        ndims = self._expected_ndims()
        if input.ndim in ndims or (not ndims and input.ndim >= 2):
            return
        name = type(self).__name__
        expected = (
            " or ".join(f"{n}-D {_LAYOUTS[n][0]}" for n in ndims) if ndims else "at least 2-D (N, C, ...)"
        )
        hint = ""
        if input.ndim in _LAYOUTS:
            layout, suggestion = _LAYOUTS[input.ndim]
            hint = f"; for {layout} use {suggestion}"
        if ndims and input.ndim == min(ndims) - 1:
            hint += "; for a single unbatched sample add the batch axis with x.unsqueeze(0)"
        raise ValueError(
            f"{name}: input must be {expected}, got {input.ndim}-D with shape {tuple(input.shape)}{hint}"
        )

    def _check_channels(self, input: Tensor) -> None:
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input has {input.shape[1]} channels (axis 1 of shape "
                f"{tuple(input.shape)}) but the layer was built with num_features="
                f"{self.num_features}; set num_features={input.shape[1]} or check the previous "
                "layer's output channels"
            )

    def _check_input(self, input: Tensor) -> None:
        self._check_input_dim(input)
        self._check_channels(input)
        running_mean, running_var = self._running_buffers()
        functional.check_args(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            self._use_batch_stats(),
            self._momentum_factor(),
            self.eps,
            where=type(self).__name__,
        )

    def _use_batch_stats(self) -> bool:
        return self.training or (self.running_mean is None and self.running_var is None)

    def _running_buffers(self) -> tuple[Tensor | None, Tensor | None]:
        if not self.training or self.track_running_stats:
            return self.running_mean, self.running_var
        return None, None

    def _tracks_this_batch(self) -> bool:
        return self.training and self.track_running_stats

    def _momentum_factor(self) -> float:
        # torch: momentum=None without a num_batches_tracked buffer means factor 0.0
        if self.momentum is not None:
            return self.momentum
        if self.num_batches_tracked is None:
            return 0.0
        return 1.0 / float(self.num_batches_tracked + 1)

    def _count_batch(self) -> None:
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)

    def _update_running_stats(self, mean: Tensor, var: Tensor, count: int) -> None:
        if not self._tracks_this_batch() or count == 0:
            return
        if self.running_mean is None or self.running_var is None:
            return
        functional.update_running_(
            self.running_mean, self.running_var, mean, var, count, self._momentum_factor()
        )
        self._count_batch()

    def forward(self, input: Tensor) -> Tensor:
        if type(input) is Tensor and _fast_class(type(self)):
            y = self._forward_fast(input)
            if y is not None:
                return y
        self._check_input_dim(input)
        if not torch.jit.is_tracing():  # a shape comparison is a TracerWarning there
            self._check_channels(input)
        tracks = self._tracks_this_batch()
        running_mean, running_var = self._running_buffers()
        y = functional._batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            self._use_batch_stats(),
            self._momentum_factor() if tracks else 0.0,
            self.eps,
            where=type(self).__name__,
        )
        # counted only once the update has happened, so a raising forward changes nothing
        if tracks and input.numel() > 0:
            self._count_batch()
        return y

    def _forward_fast(self, input: Tensor) -> Tensor | None:
        """The common eager call in one go, or None to take the general path.

        Applies to a plain CPU float32/float64 tensor with the module's own parameters and
        buffers in the same dtype, outside tracing/compiling/exporting, and without the
        ``momentum=None`` quirks. It makes the checks ``_check_input`` makes (anything unusual
        goes to the general path, which raises the proper error), runs one autograd.Function,
        and updates the running statistics in NumPy on the buffers' memory. Module call on a
        (64, 16) float32 input, one thread (CPU time, shared machine): training forward
        87 -> 45 us, eval under no_grad 83 -> 30 us, forward+backward 236 -> 150 us (torch:
        17, 9.5 and 62 us; a trivial Python autograd.Function alone costs ~58 us there).
        """
        dtype = input.dtype
        if dtype not in _FAST_DTYPES or not input.is_cpu or _torch_ops.triton_on_cpu():
            return None
        shape = input.shape
        if len(shape) not in self._expected_ndims() or shape[1] != self.num_features:
            return None
        if _custom_ops._tracing() or torch.compiler.is_exporting():
            return None
        params = self._parameters
        buffers = self._buffers
        weight, bias = params.get("weight"), params.get("bias")
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        channels = (shape[1],)
        for t in (weight, bias, running_mean, running_var):
            if t is not None and (t.dtype != dtype or not t.is_cpu or t.shape != channels):
                return None
        count = input.numel() // shape[1]
        eps = self.eps
        if self.training or (running_mean is None and running_var is None):
            if count < 2 or not eps > 0:
                return None
            tracks = (
                self.training
                and self.track_running_stats
                and running_mean is not None
                and running_var is not None
            )
            if tracks and (self.momentum is None or running_mean.requires_grad or running_var.requires_grad):
                return None
            tracked = None
            if tracks:
                # the update happens in the kernel call, on the buffers' memory, counter
                # included (bit-identical to torch's update; see kernels' update_running)
                tracked = buffers.get("num_batches_tracked")
                if tracked is not None and (
                    not tracked.is_cpu
                    or tracked.requires_grad
                    or tracked.dim() != 0
                    or tracked.is_floating_point()
                ):
                    return None  # an odd counter: the general path counts it
            arrays = _views.views(
                self,
                weight,
                bias,
                running_mean if tracks else None,
                running_var if tracks else None,
                tracked,
                float(self.momentum) if tracks else None,  # type: ignore[arg-type]
            )
            return self._fast_train(input, weight, bias, eps, arrays)
        if running_mean is None or running_var is None or count == 0:
            return None
        if _in_onnx_export():
            return None
        arrays = _views.views(self, weight, bias, running_mean, running_var, None, None)
        return self._fast_eval(input, running_mean, running_var, weight, bias, eps, arrays)

    def _fast_train(
        self, input: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, arrays: _views.Views
    ) -> Tensor:
        """``_forward_fast``'s training step: y, after updating ``arrays.running`` (None, or
        ``kernels.forward_train``'s tuple of NumPy views of the buffers) from the batch."""
        return _custom_ops.train_eager(input, weight, bias, eps, arrays)

    def _fast_eval(
        self,
        input: Tensor,
        running_mean: Tensor,
        running_var: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        eps: float,
        arrays: _views.Views,
    ) -> Tensor | None:
        """``_forward_fast``'s prediction step (None: take the general path)."""
        if not _custom_ops._needs_grad(input, weight, bias):
            return _torch_ops.normalize_running_arrays(input, eps, arrays)
        return _custom_ops.batch_norm_inference(input, running_mean, running_var, weight, bias, eps)

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for key in ("running_mean", "running_var"):
            value = state_dict.get(prefix + key)
            if not isinstance(value, Tensor) or not value.is_floating_point():
                continue
            bad = ~torch.isfinite(value)
            if key == "running_var":
                bad |= value < 0
            if bool(bad.any()):
                raise ValueError(
                    f"{type(self).__name__}: state_dict[{prefix + key!r}] has {int(bad.sum())} of "
                    f"{value.numel()} entries non-finite{' or negative' if key == 'running_var' else ''} "
                    f"(e.g. {value[bad][0].item()}); prediction would output NaN. The checkpoint "
                    "was probably saved after training diverged: load an earlier one, or reset "
                    "the statistics (reset_running_stats()) and recalibrate them on training data"
                )
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )


_DOC = """Drop-in ``torch.nn.{name}`` on the project's kernels (a subclass of it).

    Same constructor ``{name}(num_features, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, device=None, dtype=None)``, parameters, buffers, state_dict
    and train/eval behaviour; see the module docstring for the formulas and the deliberate
    differences (earlier errors, untouched state on error and for N = 0).

    Shape:
        input, output: {shapes}; ``C = num_features``.

    Example::

        >>> import torch, batchnorm.nn
        >>> bn = batchnorm.nn.{name}(16)
        >>> bn(torch.randn({example})).shape
        torch.Size([{sizes}])
    """


class BatchNorm1d(BatchNormBase, nn.BatchNorm1d):
    __doc__ = _DOC.format(
        name="BatchNorm1d", shapes="``(N, C)`` or ``(N, C, L)``", example="8, 16, 32", sizes="8, 16, 32"
    )


class BatchNorm2d(BatchNormBase, nn.BatchNorm2d):
    __doc__ = _DOC.format(
        name="BatchNorm2d",
        shapes="``(N, C, H, W)``, any memory format",
        example="8, 16, 5, 5",
        sizes="8, 16, 5, 5",
    )


class BatchNorm3d(BatchNormBase, nn.BatchNorm3d):
    __doc__ = _DOC.format(
        name="BatchNorm3d",
        shapes="``(N, C, D, H, W)``, any memory format",
        example="2, 16, 3, 5, 5",
        sizes="2, 16, 3, 5, 5",
    )
