"""Whole-model measurements: a ResNet-18-style training step, activation memory, fold.

The model: ResNet-18's layout ([2, 2, 2, 2] basic blocks, widths w, 2w, 4w, 8w) with a 3x3
stem for 32x32 inputs (the CIFAR variant), 10 classes. ``width=64`` is ResNet-18 itself;
the default 16 keeps a step near 0.1-0.3 s on 2 cores, where BN's share of the step is larger
than at width 64 (convolutions grow as width^2, BN as width).

Three BN variants: ``torch`` (torch.nn.BatchNorm2d + ReLU), ``batchnorm``
(batchnorm.nn.BatchNorm2d + ReLU) and ``act`` (BatchNormAct2d with the ReLU fused; the BN before
the residual add is BatchNormAct2d(act="identity")). ``act-save-memory`` uses leaky_relu
(invertible) with ``save_memory=True``, to measure the activation memory it saves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

VARIANTS = ("torch", "batchnorm", "act")


def _norm_act(variant: str, channels: int, relu: bool) -> Any:
    import torch.nn as nn

    if variant == "torch":
        return nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU()) if relu else nn.BatchNorm2d(channels)
    if variant == "batchnorm":
        import batchnorm.nn as bnn

        return nn.Sequential(bnn.BatchNorm2d(channels), nn.ReLU()) if relu else bnn.BatchNorm2d(channels)
    from batchnorm.nn.act import BatchNormAct2d

    if variant == "act":
        return BatchNormAct2d(channels, act="relu" if relu else "identity")
    if variant == "act-save-memory":
        return BatchNormAct2d(channels, act="leaky_relu" if relu else "identity", save_memory=True)
    raise ValueError(f"variant: expected one of {VARIANTS + ('act-save-memory',)}, got {variant!r}")


def resnet18(variant: str, width: int = 16, num_classes: int = 10) -> Any:
    """ResNet-18-style CNN for 32x32 inputs with the given BN variant."""
    import torch
    import torch.nn as nn

    class Block(nn.Module):
        def __init__(self, c_in: int, c_out: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
            self.bn1 = _norm_act(variant, c_out, relu=True)
            self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
            self.bn2 = _norm_act(variant, c_out, relu=False)
            self.shortcut: nn.Module = nn.Identity()
            if stride != 1 or c_in != c_out:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm_act(variant, c_out, relu=False)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # out-of-place add: an in-place one would modify the output save_memory keeps
            return torch.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))) + self.shortcut(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1, bias=False), _norm_act(variant, width, relu=True)]
    c_in = width
    for stage, c_out in enumerate((width, 2 * width, 4 * width, 8 * width)):
        for block in range(2):
            layers.append(Block(c_in, c_out, 2 if stage > 0 and block == 0 else 1))
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _data(batch: int, seed: int = 0) -> tuple[Any, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)


def training_step(variant: str, width: int, batch: int, channels_last: bool = False) -> Callable[[], float]:
    """A closure doing one SGD step (forward, loss, backward, update); returns the loss."""
    import torch

    torch.manual_seed(0)
    model = resnet18(variant, width)
    x, target = _data(batch)
    if channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), target)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def saved_activation_bytes(variant: str, width: int, batch: int) -> int:
    """Bytes the autograd graph of one forward keeps for backward (distinct storages), the
    activation memory of a training step."""
    import torch

    torch.manual_seed(0)
    model = resnet18(variant, width)
    x, target = _data(batch)
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), target)
    # parameters are saved too (by the convolutions) but are not activation memory
    for p in model.parameters():
        storages.pop(p.untyped_storage().data_ptr(), None)
    del loss
    return sum(storages.values())


def model_rows(width: int, batch: int, repeats: int, variants: tuple[str, ...] = VARIANTS) -> list[dict]:
    """Median step time per variant (interleaved), speed-up over torch, saved activation bytes."""
    from batchnorm.bench import timing

    steps = {v: training_step(v, width, batch) for v in variants}
    samples = timing.interleaved(steps, repeats, warmup=2)
    torch_time = timing.median(samples["torch"]) if "torch" in samples else None
    rows = []
    for v in (*variants, "act-save-memory"):
        t = timing.median(samples[v]) if v in samples else None
        rows.append(
            {
                "variant": v,
                "step_ms": None if t is None else round(t * 1e3, 2),
                "speedup": None if t is None or torch_time is None else round(torch_time / t, 3),
                "saved_activations_MB": round(saved_activation_bytes(v, width, batch) / 2**20, 2),
            }
        )
    return rows


def fold_rows(width: int, batch: int, repeats: int) -> list[dict]:
    """Eval-mode model with BN vs ``batchnorm.fold(model)``: same outputs, time per batch."""
    import torch

    import batchnorm
    from batchnorm.bench import timing

    torch.manual_seed(0)
    model = resnet18("torch", width)
    x, _ = _data(batch)
    model.train()
    with torch.no_grad():
        for _ in range(3):  # non-trivial running statistics
            model(x * 1.5 + 0.2)
    model.eval()
    folded = batchnorm.fold(model)
    with torch.no_grad():
        diff = float((model(x) - folded(x)).abs().max())
        scale = float(model(x).abs().max())

    def timed(m: Any) -> Callable[[], Any]:
        def call() -> Any:
            with torch.no_grad():
                return m(x)

        return call

    samples = timing.interleaved({"with BN": timed(model), "folded": timed(folded)}, repeats)
    base = timing.median(samples["with BN"])
    return [
        {
            "model": name,
            "ms_per_batch": round(timing.median(s) * 1e3, 3),
            "speedup": round(base / timing.median(s), 3),
            "max_abs_diff": diff,
            "max_abs_output": scale,
        }
        for name, s in samples.items()
    ]
