"""Batch norm fused with an activation, on the Triton kernels: the contract of
``batchnorm.kernels._act_dispatch`` on torch tensors (CUDA, or CPU under ``TRITON_INTERPRET=1``).

With ``z = gamma * x_hat + beta`` and ``act`` in ``ACTIVATIONS`` (``slope``: leaky_relu's)::

    forward_train(x, gamma, beta, eps, act, slope)                 -> (y, mean, var, invstd)
    forward_inference(x, gamma, beta, mean, var, eps, act, slope)  -> y
    normalize_act(x, mean, invstd, gamma, beta, act, slope)        -> y = act(z)
    backward(dy, saved, mean, invstd, gamma, beta, act, slope, from_output) -> (dx, dgamma, dbeta)
    backward_reduce_act(dy, saved, mean, invstd, gamma, beta, act, slope, from_output)
                                                                   -> (sum_dz, sum_dz_xhat)
    backward_dx_act(dy, saved, mean, invstd, gamma, beta, act, slope, from_output,
                    sum_dz, sum_dz_xhat, count)                    -> dx

    dz = dy * act'(z),  dbeta = sum dz,  dgamma = sum dz * x_hat
    dx = gamma * invstd * (dz - dbeta / m - x_hat * dgamma / m)

The activation and its derivative run inside the normalize and backward kernels: no extra
pass over memory. ``from_output=True``: ``saved`` is the output y and ``z = act^-1(y)``,
``x_hat = (z - beta) / gamma`` (identity and leaky_relu with slope > 0; gamma without zeros).
``batchnorm.kernels.triton`` re-exports these as ``forward_train_act``, ``forward_inference_act``,
``normalize_act``, ``backward_act``, ``backward_reduce_act`` and ``backward_dx_act`` (the
backward's two passes apart, for SyncBatchNormAct's all_reduce between them).

Shape:
    x, y, dy, dx: ``(N, C, *spatial)`` (outputs keep x's dtype and memory format); the rest ``(C,)``.
"""

from __future__ import annotations

import torch

from batchnorm.kernels.triton import _dispatch as d
from batchnorm.kernels.triton.act import ACT_CODES

ACTIVATIONS: dict[str, int] = dict(ACT_CODES)
INVERTIBLE = ("identity", "leaky_relu")


def forward_train(
    x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, eps: float,
    act: str = "relu", slope: float = 0.01, *, config: d.LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Batch statistics (biased var), then ``y = act(gamma * x_hat + beta)`` in the normalize pass."""
    code = d.act_code(act)
    if not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps}")
    view = d._view(x)
    gamma, beta = d._channel_vector("gamma", gamma, view), d._channel_vector("beta", beta, view)
    return d._forward_act(view, gamma, beta, eps, code, slope, d._config(config, view))


def normalize_act(
    x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, gamma: torch.Tensor | None,
    beta: torch.Tensor | None, act: str = "relu", slope: float = 0.01,
    *, config: d.LaunchConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """``y = act((x - mean) * invstd * gamma + beta)`` in one pass."""
    code = d.act_code(act)
    view = d._view(x)
    vecs = [d._channel_vector(n, t, view) for n, t in
            (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta))]  # fmt: skip
    return d._normalize(view, *vecs, code, slope, d._config(config, view))


def forward_inference(
    x: torch.Tensor, gamma: torch.Tensor | None, beta: torch.Tensor | None, running_mean: torch.Tensor,
    running_var: torch.Tensor, eps: float, act: str = "relu", slope: float = 0.01,
    *, config: d.LaunchConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """``y = act(gamma * (x - running_mean) / sqrt(running_var + eps) + beta)``."""
    stat = d._stat_dtype(x)
    invstd = torch.rsqrt(running_var.detach().to(stat) + eps)
    return normalize_act(x, running_mean.detach().to(stat), invstd, gamma, beta, act, slope, config=config)


def _check_from_output(code: int, act: str, slope: float, from_output: bool) -> None:
    if from_output and code not in [ACTIVATIONS[a] for a in INVERTIBLE]:
        raise ValueError(
            f"from_output: x_hat can be recovered from the output only for {INVERTIBLE}, got "
            f"act={act!r}; pass x as saved with from_output=False"
        )
    if from_output and code == ACTIVATIONS["leaky_relu"] and not slope > 0:
        raise ValueError(f"slope: from_output needs a leaky_relu slope > 0 to invert, got {slope}")


def _backward_pass(
    kind: str, dy: torch.Tensor, saved: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, act: str, slope: float,
    from_output: bool, extra: tuple, config: d.LaunchConfig | None,
):  # type: ignore[no-untyped-def]  # fmt: skip
    code = d.act_code(act)
    _check_from_output(code, act, slope, from_output)
    view = d._view(saved)
    dy = d._like("dy", dy, view)
    vecs = [d._channel_vector(n, t, view) for n, t in
            (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta))]  # fmt: skip
    return d._backward_launch(kind, view, dy, *vecs, code, slope, from_output, d._config(config, view), extra)


def backward_reduce_act(
    dy: torch.Tensor, saved: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, act: str = "relu", slope: float = 0.01,
    from_output: bool = False, *, config: d.LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The backward's first pass: ``(sum dz, sum dz * x_hat)`` with ``dz = dy * act'(z)``."""
    return _backward_pass("reduce", dy, saved, mean, invstd, gamma, beta, act, slope, from_output, (), config)


def backward_dx_act(
    dy: torch.Tensor, saved: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, act: str, slope: float,
    from_output: bool, sum_dz: torch.Tensor, sum_dz_xhat: torch.Tensor, count: int,
    *, config: d.LaunchConfig | None = None,
) -> torch.Tensor:  # fmt: skip
    """The backward's second pass: ``dx = gamma invstd (dz - sum_dz / count - x_hat sum_dz_xhat / count)``."""
    stat = d._stat_dtype(saved)  # the kernels read the sums in the statistics dtype
    sums = (sum_dz.to(stat).contiguous(), sum_dz_xhat.to(stat).contiguous(), int(count))
    return _backward_pass("dx", dy, saved, mean, invstd, gamma, beta, act, slope, from_output, sums, config)


def backward(
    dy: torch.Tensor, saved: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
    gamma: torch.Tensor | None, beta: torch.Tensor | None, act: str = "relu", slope: float = 0.01,
    from_output: bool = False, *, config: d.LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """``(dx, dgamma, dbeta)`` of ``y = act(gamma * x_hat + beta)`` with batch statistics."""
    code = d.act_code(act)
    _check_from_output(code, act, slope, from_output)
    view = d._view(saved)
    dy = d._like("dy", dy, view)
    vecs = [d._channel_vector(n, t, view) for n, t in
            (("mean", mean), ("invstd", invstd), ("gamma", gamma), ("beta", beta))]  # fmt: skip
    mean, invstd, gamma, beta = vecs
    if from_output and gamma is not None and bool((gamma == 0).any()):
        raise ValueError(
            "gamma: from_output divides by gamma, which has zeros; pass x with from_output=False"
        )
    return d._backward_act(
        view, dy, mean, invstd, gamma, beta, code, slope, from_output, d._config(config, view)
    )
