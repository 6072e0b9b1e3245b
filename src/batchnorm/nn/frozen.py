"""Frozen batch norm: a fixed per-channel affine map built from a trained BN layer.

Statistics and affine parameters are *buffers*, not parameters: nothing here is trained and
nothing updates, so the output is the same in train and eval mode. This is the form object
detectors fine-tune with (tiny per-GPU batches would make batch statistics useless)::

    scale = weight / sqrt(running_var + eps)
    y     = (x - running_mean) * scale + bias        (= BN's eval-mode output)

Centering first, not ``x * scale + shift``: with mean 1e4 and std 1e-2 in float32 the folded
form loses the normalized value to the rounding of ``x * scale`` (~0.06); ``x - mean`` is exact.

The state_dict has the keys of the BN it replaces (``weight``, ``bias``, ``running_mean``,
``running_var``); a BN checkpoint's ``num_batches_tracked`` is accepted and ignored on load, and
a frozen checkpoint loads into a BN (torch fills in ``num_batches_tracked`` = 0).

Shape:
    input, output: ``(N, C)`` or ``(N, C, L)`` (1d), ``(N, C, H, W)`` (2d), ``(N, C, D, H, W)`` (3d).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["FrozenBatchNorm1d", "FrozenBatchNorm2d", "FrozenBatchNorm3d"]


class _FrozenBatchNorm(nn.Module):
    _expected_dims: tuple[int, ...] = ()
    _layout: str = ""

    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: torch.Tensor
    running_var: torch.Tensor

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(
                f"{type(self).__name__}: num_features must be a positive int (the channel count C), "
                f"got {num_features!r}"
            )
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}; the usual value is 1e-5")
        self.num_features = num_features
        self.eps = float(eps)
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    @classmethod
    def from_batchnorm(cls, bn: nn.Module) -> _FrozenBatchNorm:
        """A frozen copy of ``bn``'s eval-mode map (same device and dtype; tensors are cloned).

        ``affine=False`` gives weight 1 and bias 0. A BN with ``track_running_stats=False`` has
        no statistics to freeze and is rejected.
        """
        running_mean = getattr(bn, "running_mean", None)
        running_var = getattr(bn, "running_var", None)
        if running_mean is None or running_var is None:
            raise ValueError(
                f"{cls.__name__}.from_batchnorm: bn must hold running statistics, got "
                f"{type(bn).__name__} with track_running_stats=False; it normalizes with batch "
                "statistics even in eval mode, so there is nothing to freeze. Run it with "
                "track_running_stats=True (and recalibrate) first"
            )
        frozen = cls(bn.num_features, bn.eps, device=running_mean.device, dtype=running_mean.dtype)
        with torch.no_grad():
            if getattr(bn, "weight", None) is not None:
                frozen.weight.copy_(bn.weight)
            if getattr(bn, "bias", None) is not None:
                frozen.bias.copy_(bn.bias)
            frozen.running_mean.copy_(running_mean)
            frozen.running_var.copy_(running_var)
        frozen.train(bn.training)
        return frozen

    def scale(self) -> torch.Tensor:
        """``weight / sqrt(running_var + eps)``, shape ``(C,)``."""
        return self.weight * torch.rsqrt(self.running_var + self.eps)

    def scale_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-channel ``(scale, shift)`` with ``y = x * scale + shift`` (for folding into a
        previous layer, where the offset is applied to weights, not to activations); ``(C,)``."""
        scale = self.scale()
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in self._expected_dims:
            raise ValueError(
                f"{type(self).__name__}: input must be {self._layout}, got {x.dim()}-D with "
                f"shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: input has {x.shape[1]} channels on axis 1, expected "
                f"num_features={self.num_features}; check the layer before it"
            )
        # Centered first (module docstring); the same two elementwise ops (sub, addcmul).
        view = (1, -1) + (1,) * (x.dim() - 2)
        scale = self.scale().reshape(view).to(x.dtype)
        centered = x - self.running_mean.reshape(view).to(x.dtype)
        return torch.addcmul(self.bias.reshape(view).to(x.dtype), centered, scale)

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
        # A BN checkpoint carries a step counter that has no meaning once frozen.
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class FrozenBatchNorm1d(_FrozenBatchNorm):
    """BatchNorm1d with fixed statistics and affine parameters (see the module docstring)."""

    _expected_dims = (2, 3)
    _layout = "2-D (N, C) or 3-D (N, C, L)"


class FrozenBatchNorm2d(_FrozenBatchNorm):
    """BatchNorm2d with fixed statistics and affine parameters (see the module docstring)."""

    _expected_dims = (4,)
    _layout = "4-D (N, C, H, W); for (N, C, L) use FrozenBatchNorm1d"


class FrozenBatchNorm3d(_FrozenBatchNorm):
    """BatchNorm3d with fixed statistics and affine parameters (see the module docstring)."""

    _expected_dims = (5,)
    _layout = "5-D (N, C, D, H, W)"
