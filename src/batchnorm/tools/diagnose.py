"""Diagnose train/eval mismatch of a model's batch-norm layers on given data.

At prediction time BN normalizes with its running statistics; when those do not describe the
data (fine-tuned on another domain, tiny batches, statistics gathered while weights moved) the
eval-mode network is not the one that was trained. For each BN layer, with statistics of its
input pooled over every batch (mean ``mu``, biased variance ``var``, per channel ``c``)::

    mean distance  d_c = |mu_c - running_mean_c| / sqrt(running_var_c + eps)
    variance ratio r_c = var_c / running_var_c
    output gap     g   = rms(y_train - y_eval) / rms(y_train - beta)
                       = rms(gamma * (x_hat_batch - x_hat_running)) / rms(gamma * x_hat_batch)

plus channels whose input is constant (``var_c <= eps``), dead channels (``|gamma_c|`` below a
threshold: the output is the constant beta) and extreme gamma (far from the layer's median).

Each BN sees its input as in training: the model runs in eval mode with the BN layers in
training mode (batch statistics, buffers untouched; as ``recalibrate`` does), so one stale
layer does not make every layer after it look stale. The whole model's train-vs-eval output gap
is measured too. A layer is ``stale`` (likely to hurt at prediction time) when any of ``max d``,
``max(r, 1/r)`` or ``g`` passes its ``stale`` threshold, ``warn`` past the ``warn`` ones.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from batchnorm.tools.convert import is_batchnorm
from batchnorm.tools.recalibrate import batch_input, batch_stats_mode, model_device

__all__ = ["DiagnosisReport", "LayerDiagnosis", "Thresholds", "add_arguments", "diagnose", "run"]


@dataclass(frozen=True)
class Thresholds:
    """Where a layer turns ``warn`` and ``stale``; the defaults are rules of thumb."""

    mean_distance_warn: float = 0.25  # half a running std shifts every x_hat by 0.5: stale
    mean_distance_stale: float = 0.5
    var_ratio_warn: float = 1.5  # factor either way between data and running variance
    var_ratio_stale: float = 2.0
    output_gap_warn: float = 0.1  # relative to the output's own spread
    output_gap_stale: float = 0.3
    dead_gamma: float = 1e-3  # |gamma| below this: channel outputs the constant beta
    extreme_gamma: float = 20.0  # |gamma| this many times the layer's median |gamma|


@dataclass
class LayerDiagnosis:
    """One BN layer's numbers (see the module docstring) and its verdict."""

    name: str
    kind: str
    num_features: int
    verdict: str  # "ok", "warn", "stale", or "skipped" (no running statistics / not reached)
    reasons: list[str] = field(default_factory=list)
    mean_distance_max: float = math.nan
    mean_distance_mean: float = math.nan
    var_ratio_min: float = math.nan
    var_ratio_max: float = math.nan
    output_gap: float = math.nan
    constant_channels: list[int] = field(default_factory=list)
    dead_channels: list[int] = field(default_factory=list)
    extreme_gamma_channels: list[int] = field(default_factory=list)


@dataclass
class DiagnosisReport:
    """Per-layer diagnoses, the whole model's train/eval output gap and a suggestion."""

    layers: list[LayerDiagnosis]
    model_output_gap: float
    num_batches: int
    thresholds: Thresholds = field(default_factory=Thresholds)

    @property
    def stale(self) -> list[str]:
        """Names of the layers likely to hurt at prediction time."""
        return [layer.name for layer in self.layers if layer.verdict == "stale"]

    @property
    def suggestion(self) -> str:
        stale = self.stale
        if stale:
            return (
                f"{len(stale)} BN layer(s) likely to hurt at prediction time ({', '.join(stale)}): their "
                "running statistics do not describe this data. Run batchnorm.recalibrate(model, data) "
                "on data like the data you predict on."
            )
        if any(layer.verdict == "warn" for layer in self.layers):
            return (
                "no layer is clearly stale; layers marked warn may gain from "
                "batchnorm.recalibrate(model, data)."
            )
        return "running statistics match this data; nothing to do."

    def to_dict(self) -> dict[str, Any]:
        return {
            "num_batches": self.num_batches,
            "model_output_gap": _finite(self.model_output_gap),
            "stale": self.stale,
            "suggestion": self.suggestion,
            "thresholds": asdict(self.thresholds),
            "layers": [{k: _finite(v) for k, v in asdict(layer).items()} for layer in self.layers],
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def print(self, console: Any = None) -> None:
        """Print the report as a rich table (to ``console``, default stdout)."""
        from rich.console import Console
        from rich.table import Table

        console = console or Console()
        table = Table(title=f"BN diagnosis over {self.num_batches} batch(es)")
        for column in (
            "layer",
            "kind",
            "C",
            "mean dist (max)",
            "var ratio",
            "train/eval gap",
            "channels",
            "verdict",
        ):
            table.add_column(
                column, justify="left" if column in ("layer", "kind", "channels", "verdict") else "right"
            )
        colors = {"ok": "green", "warn": "yellow", "stale": "bold red", "skipped": "dim"}
        for layer in self.layers:
            notes = [
                f"{len(v)} {label}"
                for label, v in (
                    ("constant", layer.constant_channels),
                    ("dead", layer.dead_channels),
                    ("extreme gamma", layer.extreme_gamma_channels),
                )
                if v
            ]
            table.add_row(
                layer.name,
                layer.kind,
                str(layer.num_features),
                _fmt(layer.mean_distance_max),
                f"{_fmt(layer.var_ratio_min)}-{_fmt(layer.var_ratio_max)}",
                _fmt(layer.output_gap),
                ", ".join(notes) or "-",
                f"[{colors[layer.verdict]}]{layer.verdict}[/]",
            )
        console.print(table)
        console.print(f"whole model train/eval output gap: {_fmt(self.model_output_gap)}")
        console.print(self.suggestion)


def _fmt(v: float) -> str:
    return "-" if not math.isfinite(v) else f"{v:.3g}"


def _finite(v: Any) -> Any:
    return None if isinstance(v, float) and not math.isfinite(v) else v


class _Accumulator:
    """Pooled per-channel mean/variance (Chan et al.'s parallel update, float64) and gap sums."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None
        self.gap_num = 0.0
        self.gap_den = 0.0

    def add(self, bn: nn.Module, x: torch.Tensor) -> None:
        flat = x.detach().transpose(0, 1).reshape(x.shape[1], -1).to(torch.float64)
        n = flat.shape[1]
        mean = flat.mean(dim=1)
        centered = flat - mean[:, None]
        m2 = (centered**2).sum(dim=1)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n, mean, m2
        else:
            total = self.count + n
            delta = mean - self.mean
            self.mean = self.mean + delta * n / total
            self.m2 = self.m2 + m2 + delta**2 * self.count * n / total
            self.count = total
        if bn.running_mean is None:
            return
        # y_train - y_eval = gamma * (x_hat_batch - x_hat_running); beta cancels.
        gamma = _gamma(bn).to(torch.float64)[:, None]
        x_hat_batch = centered * torch.rsqrt(m2 / n + bn.eps)[:, None]
        running_var = bn.running_var.to(torch.float64)[:, None]
        x_hat_running = (flat - bn.running_mean.to(torch.float64)[:, None]) * torch.rsqrt(
            running_var + bn.eps
        )
        self.gap_num += float(((gamma * (x_hat_batch - x_hat_running)) ** 2).sum())
        self.gap_den += float(((gamma * x_hat_batch) ** 2).sum())


def _gamma(bn: nn.Module) -> torch.Tensor:
    weight = getattr(bn, "weight", None)
    return torch.ones(bn.num_features) if weight is None else weight.detach().cpu()


def _judge(name: str, bn: nn.Module, acc: _Accumulator, t: Thresholds) -> LayerDiagnosis:
    layer = LayerDiagnosis(name=name, kind=type(bn).__name__, num_features=bn.num_features, verdict="ok")
    if getattr(bn, "running_mean", None) is None:
        layer.verdict = "skipped"
        layer.reasons.append("track_running_stats=False: uses batch statistics in eval mode too")
        return layer
    if acc.mean is None or acc.m2 is None:
        layer.verdict = "skipped"
        layer.reasons.append("not reached by the data")
        return layer
    mean, var = acc.mean.cpu(), (acc.m2 / acc.count).cpu()
    running_mean = bn.running_mean.detach().cpu().to(torch.float64)
    running_var = bn.running_var.detach().cpu().to(torch.float64)
    distance = (mean - running_mean).abs() / torch.sqrt(running_var + bn.eps)
    ratio = var / running_var.clamp_min(torch.finfo(torch.float64).tiny)
    gamma = _gamma(bn).to(torch.float64).abs()
    layer.mean_distance_max = float(distance.max())
    layer.mean_distance_mean = float(distance.mean())
    layer.var_ratio_min, layer.var_ratio_max = float(ratio.min()), float(ratio.max())
    layer.output_gap = math.sqrt(acc.gap_num / acc.gap_den) if acc.gap_den > 0 else math.nan
    layer.constant_channels = torch.nonzero(var <= bn.eps).flatten().tolist()
    layer.dead_channels = torch.nonzero(gamma < t.dead_gamma).flatten().tolist()
    median = float(gamma.median())
    if median > 0:
        layer.extreme_gamma_channels = torch.nonzero(gamma > t.extreme_gamma * median).flatten().tolist()

    spread = max(layer.var_ratio_max, 1.0 / max(layer.var_ratio_min, 1e-300))
    checks = (
        ("mean distance", layer.mean_distance_max, t.mean_distance_warn, t.mean_distance_stale),
        ("variance ratio", spread, t.var_ratio_warn, t.var_ratio_stale),
        ("train/eval output gap", layer.output_gap, t.output_gap_warn, t.output_gap_stale),
    )
    for label, value, warn, stale in checks:
        if value > stale:
            layer.verdict = "stale"
            layer.reasons.append(f"{label} {value:.3g} > {stale}")
        elif value > warn:
            layer.reasons.append(f"{label} {value:.3g} > {warn}")
    if layer.verdict == "ok" and (layer.reasons or layer.constant_channels or layer.extreme_gamma_channels):
        layer.verdict = "warn"
    if layer.constant_channels:
        layer.reasons.append(f"{len(layer.constant_channels)} channel(s) with constant input")
    if layer.extreme_gamma_channels:
        layer.reasons.append(f"{len(layer.extreme_gamma_channels)} channel(s) with extreme gamma")
    return layer


def _relative_gap(train_out: Any, eval_out: Any) -> tuple[float, float]:
    from torch.utils import _pytree

    num = den = 0.0
    for a, b in zip(_pytree.tree_leaves(train_out), _pytree.tree_leaves(eval_out), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            num += float(((a.double() - b.double()) ** 2).sum())
            den += float((a.double() ** 2).sum())
    return num, den


def diagnose(
    model: nn.Module, data: Iterable[Any], num_batches: int = 10, thresholds: Thresholds | None = None
) -> DiagnosisReport:
    """Compare each BN layer's running statistics with the statistics of ``data``.

    ``data`` is an iterable of batches, a batch being a tensor or a tuple/list whose first item
    is the input; at most ``num_batches`` are used. The model is not modified (flags, momentum
    and buffers are restored). Returns a ``DiagnosisReport`` (``.print()``, ``.to_json()``).

    Shape:
        each batch's input: whatever ``model`` takes; BN inputs ``(N, C, *spatial)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"diagnose: model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"diagnose: num_batches must be a positive int, got {num_batches!r}")
    thresholds = thresholds or Thresholds()
    named = [(name, m) for name, m in model.named_modules() if is_batchnorm(m)]
    accumulators = {m: _Accumulator() for _, m in named}

    def hook(bn: nn.Module, args: tuple[Any, ...]) -> None:
        accumulators[bn].add(bn, args[0])

    device = model_device(model)
    gap_num = gap_den = 0.0
    seen = 0
    for batch in itertools.islice(data, num_batches):
        x = batch_input(batch)
        x = x.to(device) if device is not None else x
        with batch_stats_mode(model, [m for _, m in named], hook):
            train_out = model(x)
        was_training = model.training
        model.eval()
        with torch.no_grad():
            eval_out = model(x)
        model.train(was_training)
        num, den = _relative_gap(train_out, eval_out)
        gap_num, gap_den, seen = gap_num + num, gap_den + den, seen + 1
    if seen == 0:
        raise ValueError("diagnose: data yielded no batch; pass an iterable of input tensors")
    layers = [_judge(name, m, accumulators[m], thresholds) for name, m in named]
    model_gap = math.sqrt(gap_num / gap_den) if gap_den > 0 else math.nan
    return DiagnosisReport(layers=layers, model_output_gap=model_gap, num_batches=seen, thresholds=thresholds)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        help="import path of the model: 'package.module:attribute' (a module, or a "
        "factory called with no arguments)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data",
        help="a .pt file holding an input tensor (N, ...) or a tuple/list whose first "
        "item is one; split along axis 0 into batches",
    )
    source.add_argument(
        "--synthetic", metavar="SHAPE", help="per-sample input shape, e.g. 3,32,32: standard normal batches"
    )
    parser.add_argument("--state-dict", help="a .pt state_dict to load into the model first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-batches", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0, help="seed for --synthetic")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    parser.add_argument("--strict", action="store_true", help="exit with status 1 when a layer is stale")


def load_model(path: str) -> nn.Module:
    """The model at ``'package.module:attribute'``; a non-module attribute is called with no arguments."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"model must look like 'package.module:attribute', got {path!r}")
    obj: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        obj = getattr(obj, part)
    model = obj if isinstance(obj, nn.Module) else obj()
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: {path!r} gave a {type(model).__name__}, expected a torch.nn.Module")
    return model


def _batches(args: argparse.Namespace) -> list[torch.Tensor]:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.data:
        inputs = batch_input(torch.load(args.data, weights_only=True))
        return list(inputs.split(args.batch_size))[: args.num_batches]
    shape = tuple(int(s) for s in args.synthetic.replace("x", ",").split(",") if s.strip())
    generator = torch.Generator().manual_seed(args.seed)
    return [torch.randn((args.batch_size, *shape), generator=generator) for _ in range(args.num_batches)]


def run(args: argparse.Namespace) -> int:
    try:
        model = load_model(args.model)
        if args.state_dict:
            model.load_state_dict(torch.load(args.state_dict, weights_only=True))
        report = diagnose(model, _batches(args), num_batches=args.num_batches)
    except (ValueError, TypeError, ImportError, AttributeError, OSError) as err:
        import sys

        print(f"batchnorm diagnose: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(report.to_json())
    else:
        report.print()
    return 1 if args.strict and report.stale else 0
