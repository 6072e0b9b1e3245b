"""Fold batch norm into the convolution or linear layer before it, for prediction.

In eval mode BN is a fixed per-channel affine map, so after a layer ``z = W * x + b`` it can be
absorbed into that layer's weight and bias (``o`` indexes output channels)::

    scale[o] = gamma[o] / sqrt(running_var[o] + eps)
    W'[o]    = W[o] * scale[o]
    b'[o]    = (b[o] - running_mean[o]) * scale[o] + beta[o]

and ``BN(W * x + b) = W' * x + b'`` exactly (up to rounding). ``fold_weights`` is that formula;
``fold`` finds the Conv/ConvTranspose/Linear -> BN pairs of a model (through torch.fx, or by
walking ``nn.Sequential`` children when the model does not trace), folds each one and replaces
the BN by ``nn.Identity`` (or by its fused activation for BatchNormAct).

A pair folds only when the layer's output feeds the BN and nothing else: in a residual block
where the pre-BN tensor also goes to the skip connection, the skip would see folded (normalized)
values. A BN with ``track_running_stats=False`` normalizes with batch statistics even in eval
mode and cannot fold.
"""

from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import torch
from torch import nn
from torch.utils import _pytree

from batchnorm.tools.convert import activation_of, bn_dim, is_batchnorm

__all__ = ["FOLDABLE_LAYERS", "FoldReport", "fold", "fold_layer", "fold_weights"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FOLDABLE_LAYERS: tuple[type[nn.Module], ...] = (*_CONV, *_CONV_TRANSPOSE, nn.Linear)


def fold_weights(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold BN's eval-mode map into a layer's ``(weight, bias)``; returns new tensors.

    ``scale = gamma / sqrt(running_var + eps)``, ``W' = W * scale`` along output channels,
    ``b' = (b - running_mean) * scale + beta``. ``bias``/``gamma``/``beta`` None mean 0/1/0.
    Computed in float64 and cast back to ``weight``'s dtype, so the fold adds one rounding.

    Shape:
        weight: ``(C_out, C_in / groups, *k)`` (Conv, Linear), or ``(C_in, C_out / groups, *k)``
        when ``transposed`` (ConvTranspose); bias and statistics: ``(C_out,)``.
    """
    w = weight.detach().to(torch.float64)
    out_channels = w.shape[1] * groups if transposed else w.shape[0]
    if running_mean.shape != (out_channels,):
        raise ValueError(
            f"fold_weights: running_mean must have one entry per output channel ({out_channels}), "
            f"got shape {tuple(running_mean.shape)}; is the BN applied to this layer's output?"
        )
    f64 = lambda t, default: (  # noqa: E731
        torch.full((out_channels,), default, dtype=torch.float64, device=w.device)
        if t is None
        else t.detach().to(device=w.device, dtype=torch.float64)
    )
    scale = f64(gamma, 1.0) * torch.rsqrt(f64(running_var, 1.0) + eps)
    new_bias = (f64(bias, 0.0) - f64(running_mean, 0.0)) * scale + f64(beta, 0.0)
    kernel_dims = (1,) * (w.dim() - 2)  # one per kernel axis; Linear has none
    if transposed:
        # (C_in, C_out/g, *k): output channel g*(C_out/g) + j lives at [g-th block of C_in, j].
        per_group = w.shape[1]
        blocks = w.reshape(groups, w.shape[0] // groups, per_group, *w.shape[2:])
        new_w = (blocks * scale.reshape(groups, 1, per_group, *kernel_dims)).reshape(w.shape)
    else:
        new_w = w * scale.reshape(-1, 1, *kernel_dims)
    return new_w.to(weight.dtype), new_bias.to(weight.dtype)


def fold_layer(layer: nn.Module, bn: nn.Module) -> nn.Module:
    """A copy of ``layer`` (Conv/ConvTranspose/Linear) with eval-mode ``bn`` folded in.

    ``requires_grad`` of the weight carries over to the new weight and bias.
    """
    if not isinstance(layer, FOLDABLE_LAYERS):
        raise TypeError(
            f"fold_layer: layer must be one of {', '.join(c.__name__ for c in FOLDABLE_LAYERS)}, "
            f"got {type(layer).__name__}"
        )
    if getattr(bn, "running_mean", None) is None:
        raise ValueError(
            f"fold_layer: bn ({type(bn).__name__}) has no running statistics "
            "(track_running_stats=False) and normalizes with batch statistics even in eval mode"
        )
    transposed = isinstance(layer, _CONV_TRANSPOSE)
    new_w, new_b = fold_weights(
        layer.weight,
        layer.bias,
        bn.running_mean,
        bn.running_var,
        getattr(bn, "weight", None),
        getattr(bn, "bias", None),
        bn.eps,
        transposed=transposed,
        groups=getattr(layer, "groups", 1),
    )
    folded = copy.deepcopy(layer)
    requires_grad = layer.weight.requires_grad
    folded.weight = nn.Parameter(new_w, requires_grad=requires_grad)
    folded.bias = nn.Parameter(new_b, requires_grad=requires_grad)
    return folded


@dataclass
class FoldReport:
    """What ``fold`` did: folded ``(layer, bn)`` name pairs, BNs left alone with the reason, how
    the pairs were found (``"fx"`` or ``"sequential"``) and, given a probe input, the max abs
    difference between the folded and the unfolded eval-mode outputs."""

    folded: list[tuple[str, str]] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    method: str = "fx"
    max_abs_diff: float | None = None
    max_abs_output: float | None = None

    def __str__(self) -> str:
        lines = [f"folded {len(self.folded)} BN layer(s) (found with {self.method})"]
        lines += [f"  {bn} -> {layer}" for layer, bn in self.folded]
        lines += [f"  left {bn}: {reason}" for bn, reason in self.left]
        if self.max_abs_diff is not None:
            lines.append(f"max abs difference on the probe: {self.max_abs_diff:.3g}")
        return "\n".join(lines)


class _Tracer(torch.fx.Tracer):
    """Keeps BN modules (ours run custom kernels) and foldable layers as graph leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (
            is_batchnorm(m)
            or isinstance(m, FOLDABLE_LAYERS)
            or super().is_leaf_module(m, module_qualified_name)
        )


def _out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def _pair_problem(layer: nn.Module, bn: nn.Module) -> str | None:
    if getattr(bn, "running_mean", None) is None:
        return "track_running_stats=False: it uses batch statistics even in eval mode"
    if _out_channels(layer) != bn.num_features:
        return f"channel count mismatch ({_out_channels(layer)} outputs vs num_features={bn.num_features})"
    if isinstance(layer, nn.Linear) and bn_dim(bn) not in (1, None):
        return "Linear followed by a BN that is not 1d"
    return None


def _pairs_fx(
    model: nn.Module, example_input: Any
) -> tuple[tuple[list[tuple[str, str]], list[tuple[str, str]]] | None, str]:
    """``((pairs, left), "")``, or ``(None, why)`` when the model does not trace."""
    try:
        graph = _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure sends us to the fallback
        return None, f"{type(err).__name__}: {str(err).splitlines()[0][:120] if str(err) else ''}"
    modules = dict(model.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    attr_roots = {str(n.target).rsplit(".", 1)[0] for n in graph.nodes if n.op == "get_attr"}
    shapes: dict[str, tuple[int, ...]] = {}
    if example_input is not None:
        from torch.fx.passes.shape_prop import ShapeProp

        gm = torch.fx.GraphModule(model, graph)
        ShapeProp(gm).propagate(*_as_args(example_input))
        shapes = {
            n.name: tuple(n.meta["tensor_meta"].shape)
            for n in gm.graph.nodes
            if hasattr(n.meta.get("tensor_meta"), "shape")  # tuple outputs carry a tuple of metas
        }

    pairs: list[tuple[str, str]] = []
    left: list[tuple[str, str]] = []
    seen_bn: set[str] = set()
    for node in graph.nodes:
        if node.op != "call_module" or not is_batchnorm(modules[node.target]):
            continue
        bn_name, bn = str(node.target), modules[node.target]
        if bn_name in seen_bn:
            continue
        seen_bn.add(bn_name)
        source = node.args[0] if node.args else None
        if calls[bn_name] > 1 or bn_name in attr_roots:
            left.append((bn_name, "the BN module is used at more than one place"))
        elif not isinstance(source, torch.fx.Node) or len(node.args) != 1 or node.kwargs:
            left.append((bn_name, "its input is not a single tensor from a layer"))
        elif source.op != "call_module" or not isinstance(modules[source.target], FOLDABLE_LAYERS):
            what = modules[source.target].__class__.__name__ if source.op == "call_module" else source.name
            left.append((bn_name, f"its input comes from {what}, not from a Conv/ConvTranspose/Linear"))
        elif len(source.users) != 1:
            others = ", ".join(u.name for u in source.users if u is not node)
            left.append(
                (bn_name, f"the output of {source.target} is also used by {others} (e.g. a skip connection)")
            )
        elif calls[source.target] > 1 or str(source.target) in attr_roots:
            left.append((bn_name, f"{source.target} is used at more than one place"))
        elif isinstance(modules[source.target], nn.Linear) and len(shapes.get(source.name, (0, 0))) != 2:
            left.append((bn_name, "Linear output is not 2-D (N, C), so BN normalizes another axis"))
        else:
            problem = _pair_problem(modules[source.target], bn)
            if problem is None:
                pairs.append((str(source.target), bn_name))
            else:
                left.append((bn_name, problem))
    for name, _ in _named_bns(model):
        if name not in seen_bn:
            left.append((name, "not called in forward"))
    return (pairs, left), ""


def _named_bns(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]


def _pairs_sequential(model: nn.Module, reason: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    uses = Counter(id(m) for _, m in model.named_modules(remove_duplicate=False))
    pairs: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (layer_name, layer), (bn_name, bn) in zip(children, children[1:], strict=False):
            if (
                isinstance(layer, FOLDABLE_LAYERS)
                and is_batchnorm(bn)
                and uses[id(layer)] == 1
                and uses[id(bn)] == 1
                and _pair_problem(layer, bn) is None
            ):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + layer_name, prefix + bn_name))
    folded_bns = {bn for _, bn in pairs}
    left = [
        (
            name,
            f"model does not trace with torch.fx ({reason}); "
            "only Conv/Linear -> BN inside nn.Sequential fold",
        )
        for name, _ in _named_bns(model)
        if name not in folded_bns
    ]
    return pairs, left


def _as_args(example_input: Any) -> tuple[Any, ...]:
    return tuple(example_input) if isinstance(example_input, tuple) else (example_input,)


def _max_abs_diff(a: Any, b: Any) -> tuple[float, float]:
    diff, peak = 0.0, 0.0
    for x, y in zip(_pytree.tree_leaves(a), _pytree.tree_leaves(b), strict=True):
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            diff = max(diff, (x.double() - y.double()).abs().max().item() if x.numel() else 0.0)
            peak = max(peak, x.double().abs().max().item() if x.numel() else 0.0)
    return diff, peak


@overload
def fold(model: nn.Module, example_input: Any = ..., *, return_report: Literal[False] = ...) -> nn.Module: ...
@overload
def fold(
    model: nn.Module, example_input: Any = ..., *, return_report: Literal[True]
) -> tuple[nn.Module, FoldReport]: ...
def fold(
    model: nn.Module, example_input: Any = None, *, return_report: bool = False
) -> nn.Module | tuple[nn.Module, FoldReport]:
    """An eval-mode copy of ``model`` with every foldable BN folded into the layer before it.

    ``model`` is left untouched. ``example_input`` (a tensor, or a tuple of positional
    arguments) is run through both models to measure the max abs difference, and lets
    fold check that a Linear's output is 2-D. With ``return_report=True`` returns
    ``(folded_model, FoldReport)``: the folded pairs, the BNs left alone and why.

    Shape:
        the model's own; folding changes no shape.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fold: model must be a torch.nn.Module, got {type(model).__name__}")
    reference = copy.deepcopy(model).eval()
    found, why = _pairs_fx(reference, example_input)
    method = "fx" if found is not None else "sequential"
    pairs, left = found if found is not None else _pairs_sequential(reference, why)

    folded = copy.deepcopy(reference)
    for layer_name, bn_name in pairs:
        bn = folded.get_submodule(bn_name)
        folded.set_submodule(layer_name, fold_layer(folded.get_submodule(layer_name), bn))
        act = activation_of(bn)
        folded.set_submodule(bn_name, nn.Identity() if act is None else act)
    report = FoldReport(folded=pairs, left=left, method=method)
    if example_input is not None:
        with torch.no_grad():
            expected = reference(*_as_args(example_input))
            actual = folded(*_as_args(example_input))
        report.max_abs_diff, report.max_abs_output = _max_abs_diff(expected, actual)
    return (folded, report) if return_report else folded
