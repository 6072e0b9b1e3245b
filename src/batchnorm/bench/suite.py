"""What ``batchnorm bench`` measures: shapes, modes, the memory-traffic bound, implementations.

Memory-traffic accounting (``B`` = bytes of x; the bound is the time to move these bytes at the
copy bandwidth measured in the same run, counting a copy as read + write)::

    train     (training forward):  read x twice (statistics, normalize) + write y     = 3 B
    eval      (inference forward): read x + write y                                   = 2 B
    train_bwd (forward+backward):  forward 3 B + backward: read x and dy twice
                                   (the two sums, then dx) + write dx                 = 8 B

A shape that fits in the last-level cache can beat this DRAM bound (fraction > 100%).

``IMPLEMENTATIONS`` is the one table both the benchmark and the parity tests run: each entry
builds, for a case and a mode, a zero-argument callable that does one module call as a user
makes it (autograd included) and returns what it computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

MODES = ("train", "eval", "train_bwd")
TRAFFIC = {"train": 3, "eval": 2, "train_bwd": 8}  # multiples of x's bytes, see above
DTYPES = {"f32": np.float32, "f64": np.float64}

# Issue #7: ResNet-50's BN shapes at batch 16, MLP shapes, small C, channels-last, float64.
DEFAULT_SHAPES = (
    "16x64x112x112,16x256x56x56,16x512x28x28,16x1024x14x14,16x2048x7x7,"
    "256x1024,4096x256,64x3x64x64,256x16x32x32,cl:16x64x56x56,f64:16x256x28x28"
)


@dataclass(frozen=True)
class Case:
    """One input: shape, dtype name (``f32``/``f64``) and layout (``nchw`` or ``cl``)."""

    shape: tuple[int, ...]
    dtype: str = "f32"
    layout: str = "nchw"

    @property
    def label(self) -> str:
        prefix = "".join(
            f"{p}:"
            for p in (self.layout if self.layout == "cl" else "", self.dtype if self.dtype != "f32" else "")
            if p
        )
        return prefix + "x".join(map(str, self.shape))

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(DTYPES[self.dtype]).itemsize


def parse_shapes(text: str) -> list[Case]:
    """``"16x64x112x112,256x1024,cl:16x64x56x56,f64:16x256x28x28"`` -> cases.

    Prefixes (any order): ``cl:`` channels-last (4-D only), ``f64:``/``f32:`` dtype.
    """
    cases = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        *prefixes, dims = item.split(":")
        dtype, layout = "f32", "nchw"
        for p in prefixes:
            if p in DTYPES:
                dtype = p
            elif p in ("cl", "nchw"):
                layout = p
            else:
                raise ValueError(f"--shapes: unknown prefix {p!r} in {item!r}; expected cl:, f32: or f64:")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {item!r} is not like 16x64x56x56 (integers joined by x)") from None
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"--shapes: {item!r} needs at least (N, C), all positive, got {shape}")
        if layout == "cl" and len(shape) != 4:
            raise ValueError(f"--shapes: channels-last needs a 4-D shape, got {item!r}")
        cases.append(Case(shape, dtype, layout))
    if not cases:
        raise ValueError(f"--shapes: no shape in {text!r}")
    return cases


def bound_seconds(case: Case, mode: str, bandwidth: float) -> float:
    """The memory-traffic bound of ``mode`` on ``case`` at ``bandwidth`` bytes/s."""
    return TRAFFIC[mode] * case.nbytes / bandwidth


@dataclass
class Inputs:
    x: Any  # torch tensor in the case's layout
    dy: Any


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    import torch

    g = torch.Generator().manual_seed(seed)
    dtype = torch.float64 if case.dtype == "f64" else torch.float32
    x = torch.randn(case.shape, generator=g, dtype=dtype) * 2 + 1
    dy = torch.randn(case.shape, generator=g, dtype=dtype)
    if case.layout == "cl":
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return Inputs(x, dy)


def _module_call(module: Any, inputs: Inputs, mode: str, post: Callable | None = None) -> Callable[[], Any]:
    """One call of ``post(module(x))`` as a user makes it in ``mode``."""
    import torch

    post = post or (lambda v: v)
    module = module.to(inputs.x.dtype)
    if mode == "eval":
        module.eval()

        def call() -> Any:
            with torch.no_grad():
                return post(module(inputs.x))

        return call
    module.train()
    if mode == "train":
        return lambda: post(module(inputs.x))
    x = inputs.x.detach().clone().requires_grad_(True)

    def call_bwd() -> Any:
        x.grad = None
        module.zero_grad(set_to_none=True)
        y = post(module(x))
        y.backward(inputs.dy)
        return y, x.grad

    return call_bwd


def _torch_bn(ndim: int, channels: int) -> Any:
    import torch

    return {
        2: torch.nn.BatchNorm1d,
        3: torch.nn.BatchNorm1d,
        4: torch.nn.BatchNorm2d,
        5: torch.nn.BatchNorm3d,
    }[ndim](channels)


def torch_factory(case: Case, inputs: Inputs, mode: str) -> Callable[[], Any]:
    return _module_call(_torch_bn(len(case.shape), case.shape[1]), inputs, mode)


def batchnorm_factory(case: Case, inputs: Inputs, mode: str) -> Callable[[], Any]:
    import batchnorm.nn as bnn

    cls = {2: bnn.BatchNorm1d, 3: bnn.BatchNorm1d, 4: bnn.BatchNorm2d, 5: bnn.BatchNorm3d}[len(case.shape)]
    return _module_call(cls(case.shape[1]), inputs, mode)


def torch_relu_factory(case: Case, inputs: Inputs, mode: str) -> Callable[[], Any]:
    import torch

    return _module_call(_torch_bn(len(case.shape), case.shape[1]), inputs, mode, torch.relu)


def act_factory(case: Case, inputs: Inputs, mode: str) -> Callable[[], Any]:
    from batchnorm.nn.act import BatchNormAct1d, BatchNormAct2d

    if len(case.shape) > 4:
        raise NotImplementedError("BatchNormAct has 1d and 2d forms only")
    cls = BatchNormAct2d if len(case.shape) == 4 else BatchNormAct1d
    return _module_call(cls(case.shape[1], act="relu"), inputs, mode)


def numpy_factory(case: Case, inputs: Inputs, mode: str) -> Callable[[], Any]:
    """The naive NumPy implementation: the reference, whole-array expressions and temporaries."""
    from batchnorm import reference

    x, dy = inputs.x.numpy(), inputs.dy.numpy()
    channels = case.shape[1]
    gamma, beta = np.ones(channels, x.dtype), np.zeros(channels, x.dtype)
    running_mean, running_var = np.zeros(channels, x.dtype), np.ones(channels, x.dtype)
    if mode == "eval":
        return lambda: reference.forward_inference(x, gamma, beta, running_mean, running_var)
    if mode == "train":
        return lambda: reference.forward(x, gamma, beta)[0]

    def call_bwd() -> Any:
        y, cache = reference.forward(x, gamma, beta)
        return y, reference.backward_compact(dy, cache)[0]

    return call_bwd


@dataclass(frozen=True)
class Implementation:
    factory: Callable[[Case, Inputs, str], Callable[[], Any]]
    baseline: str  # the implementation its speed-up is measured against
    act: str = "identity"  # the activation it applies after BN


IMPLEMENTATIONS: dict[str, Implementation] = {
    "torch": Implementation(torch_factory, "torch"),
    "batchnorm": Implementation(batchnorm_factory, "torch"),
    "numpy": Implementation(numpy_factory, "torch"),
    "torch+relu": Implementation(torch_relu_factory, "torch+relu", "relu"),
    "batchnorm-act": Implementation(act_factory, "torch+relu", "relu"),
}
DEFAULT_IMPLEMENTATIONS = ("torch", "batchnorm", "numpy", "torch+relu", "batchnorm-act")
