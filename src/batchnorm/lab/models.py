"""Models for the lab: an MLP and a small ResNet-style CNN, each with a pluggable norm layer.

Every norm layer comes from :func:`norm_layer`, and every batch-norm layer from
:func:`batch_norm`, so which implementation the lab measures is decided in one place.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["MLP", "NORMS", "ResNet", "batch_norm", "bn_implementation", "norm_layer"]

NORMS = ("bn", "none", "group", "ghost", "renorm")


def bn_implementation() -> str:
    """Which module :func:`batch_norm` builds: ``batchnorm.nn`` when importable, else ``torch.nn``.

    ``BATCHNORM_LAB_BN=torch`` in the environment picks torch.nn's, to compare the two.
    """
    if os.environ.get("BATCHNORM_LAB_BN", "").lower() == "torch":
        return "torch.nn"
    try:
        import batchnorm.nn.batchnorm  # noqa: F401
    except ImportError:
        return "torch.nn"
    return "batchnorm.nn"


def batch_norm(num_features: int, dim: int = 1) -> nn.Module:
    """The project's ``BatchNorm1d`` (``dim=1``, also for ``(N, C)``) or ``BatchNorm2d`` (``dim=2``).

    Falls back to torch.nn's (same constructor, same maths) only when the project's modules
    are not importable; results record which one ran (:func:`bn_implementation`).
    """
    if bn_implementation() == "batchnorm.nn":
        from batchnorm import nn as bnn

        return bnn.BatchNorm1d(num_features) if dim == 1 else bnn.BatchNorm2d(num_features)
    return nn.BatchNorm1d(num_features) if dim == 1 else nn.BatchNorm2d(num_features)


def norm_layer(
    kind: str, num_features: int, dim: int = 1, *, virtual_batch_size: int = 16, renorm_warmup: int = 100
) -> nn.Module:
    """A normalization layer over ``num_features`` channels.

    kind: ``bn`` (batch norm), ``none`` (identity), ``group`` (torch.nn.GroupNorm, up to 8
    groups: batch-independent), ``ghost`` (Ghost BN over virtual batches of
    ``virtual_batch_size``), ``renorm`` (Batch Renormalization, plain BN for the first
    ``renorm_warmup`` steps, then the correction with r_max 3, d_max 5 at once; the module's
    default warm-up of 5000 steps would outlast the lab's runs). ``ghost`` and ``renorm`` are the
    project's modules; they exist for ``dim=1`` only here.
    """
    if kind == "bn":
        return batch_norm(num_features, dim)
    if kind == "none":
        return nn.Identity()
    if kind == "group":
        groups = math.gcd(num_features, 8)
        return nn.GroupNorm(groups, num_features)
    if kind in ("ghost", "renorm"):
        if dim != 1:
            raise ValueError(f"norm_layer: kind={kind!r} is available for dim=1 only, got dim={dim}")
        from batchnorm import nn as bnn

        if kind == "ghost":
            return bnn.GhostBatchNorm1d(num_features, virtual_batch_size)
        return bnn.BatchRenorm1d(num_features, warmup_steps=renorm_warmup)
    raise ValueError(f"norm_layer: kind must be one of {', '.join(NORMS)}, got {kind!r}")


_ACTIVATIONS = {"sigmoid": nn.Sigmoid, "relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """``Linear -> norm -> activation`` per hidden layer, then a linear classifier.

    As in the paper, the norm sits between the affine map and the nonlinearity, and a normed
    linear layer has no bias (BN's beta replaces it). Weights are Gaussian with standard
    deviation ``init_scale / sqrt(fan_in)``; biases start at zero.

    ``norm_options`` go to :func:`norm_layer`. ``activations[i]`` is the i-th hidden
    nonlinearity module: a forward hook on it sees the layer's pre-activations (the "input to
    a sigmoid" of the paper's Figure 1).

    Shape:
        input ``(N, *)`` flattened to ``(N, in_features)``; output ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (100, 100, 100),
        *,
        activation: str = "sigmoid",
        norm: str = "none",
        init_scale: float = 1.0,
        norm_options: dict | None = None,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"MLP: activation must be one of {', '.join(_ACTIVATIONS)}, got {activation!r}")
        layers: list[nn.Module] = [nn.Flatten()]
        self.linears: list[nn.Linear] = []
        self.norms: list[nn.Module] = []
        self.activations: list[nn.Module] = []
        width = in_features
        for h in hidden:
            linear = nn.Linear(width, h, bias=norm == "none")
            normed = norm_layer(norm, h, 1, **(norm_options or {}))
            act = _ACTIVATIONS[activation]()
            layers += [linear, normed, act]
            self.linears.append(linear)
            self.norms.append(normed)
            self.activations.append(act)
            width = h
        head = nn.Linear(width, num_classes)
        self.linears.append(head)
        layers.append(head)
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for linear in self.linears:
                linear.weight.normal_(0.0, init_scale / math.sqrt(linear.in_features))
                if linear.bias is not None:
                    linear.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Block(nn.Module):
    """A ResNet basic block: two ``conv -> norm`` with a ReLU between, plus the shortcut."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, dim: int) -> None:
        super().__init__()
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        bias = norm == "none"
        self.conv1 = conv(c_in, c_out, 3, stride, 1, bias=bias)
        self.norm1 = norm_layer(norm, c_out, dim)
        self.conv2 = conv(c_out, c_out, 3, 1, 1, bias=bias)
        self.norm2 = norm_layer(norm, c_out, dim)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                conv(c_in, c_out, 1, stride, bias=bias), norm_layer(norm, c_out, dim)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        return torch.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A small ResNet: ``conv-norm-ReLU`` stem, basic blocks doubling width at each stage, pooling.

    ``dim=1`` for signals ``(N, C, L)`` (MNIST-1D), ``dim=2`` for images ``(N, C, H, W)``.

    Shape:
        input ``(N, in_channels, *spatial)``; output ``(N, num_classes)``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        width: int = 16,
        stages: int = 2,
        norm: str = "bn",
        dim: int = 1,
    ) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"ResNet: dim must be 1 (signals) or 2 (images), got {dim}")
        conv = nn.Conv1d if dim == 1 else nn.Conv2d
        self.stem = nn.Sequential(
            conv(in_channels, width, 3, 1, 1, bias=norm == "none"), norm_layer(norm, width, dim), nn.ReLU()
        )
        blocks, c = [], width
        for stage in range(stages):
            c_out = width * 2**stage
            blocks.append(_Block(c, c_out, 1 if stage == 0 else 2, norm, dim))
            c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool1d(1) if dim == 1 else nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.blocks(self.stem(x))).flatten(1))
