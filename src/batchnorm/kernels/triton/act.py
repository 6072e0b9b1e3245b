"""Triton helpers: the activation fused after batch norm, and its derivative.

Codes as in the CPU kernels (``batchnorm.kernels.act``): 0 identity, 1 relu, 2 leaky_relu
(``slope``), 3 silu. With ``z = gamma * x_hat + beta`` (pre-activation)::

    y  = act(z)
    dz = dy * act'(z)        relu'(0) = 0 as in torch;  silu'(z) = s (1 + z (1 - s)), s = sigmoid(z)

``ACT`` is a ``tl.constexpr``, so the identity costs nothing in the plain kernels that share
these helpers. ``pre_act`` recovers z from a saved output y (the InPlace-ABN trick used when
only y is kept): invertible for identity and leaky_relu with slope > 0 only, which the
dispatch checks.
"""

from __future__ import annotations

import triton
import triton.language as tl

# tl.constexpr: the Triton compiler reads globals inside @jit functions only when they are constexpr.
IDENTITY = tl.constexpr(0)
RELU = tl.constexpr(1)
LEAKY_RELU = tl.constexpr(2)
SILU = tl.constexpr(3)
ACT_CODES = {"identity": 0, "relu": 1, "leaky_relu": 2, "silu": 3}


@triton.jit
def activate(z, slope, ACT: tl.constexpr):
    """y = act(z)."""
    if ACT == RELU:
        z = tl.where(z > 0, z, 0)
    elif ACT == LEAKY_RELU:
        z = tl.where(z > 0, z, z * slope)
    elif ACT == SILU:
        z = z / (1 + tl.exp(-z))
    return z


@triton.jit
def activate_grad(z, slope, ACT: tl.constexpr):
    """d act / dz at z."""
    if ACT == RELU:
        g = tl.where(z > 0, 1.0, 0.0)
    elif ACT == LEAKY_RELU:
        g = tl.where(z > 0, 1.0, slope)
    elif ACT == SILU:
        s = 1 / (1 + tl.exp(-z))
        g = s * (1 + z * (1 - s))
    else:
        g = tl.full(z.shape, 1.0, z.dtype)
    return g.to(z.dtype)


@triton.jit
def pre_act(y, slope, ACT: tl.constexpr):
    """z = act^-1(y) for the invertible activations (identity, leaky_relu with slope > 0)."""
    if ACT == LEAKY_RELU:
        y = tl.where(y > 0, y, y / slope)
    return y
