"""fold: BN folded into the Conv/ConvTranspose/Linear before it equals the eval-mode model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
from batchnorm import reference
from batchnorm.nn import BatchNorm1d, BatchNorm2d, BatchNormAct2d, BatchRenorm2d, GhostBatchNorm2d
from batchnorm.nn.frozen import FrozenBatchNorm2d
from batchnorm.tools.fold import fold, fold_layer, fold_weights

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Running statistics and affine parameters far from their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                n = m.running_mean.numel()
                m.running_mean.copy_(torch.randn(n, generator=g) * 2)
                m.running_var.copy_(torch.rand(n, generator=g) * 3 + 0.1)
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model


# (layer factory, BN class, input shape): every foldable layer kind
LAYERS = {
    "conv1d": (lambda bias, groups: nn.Conv1d(4, 6, 3, groups=groups, bias=bias), nn.BatchNorm1d, (3, 4, 9)),
    "conv2d": (
        lambda bias, groups: nn.Conv2d(4, 6, 3, groups=groups, bias=bias),
        nn.BatchNorm2d,
        (3, 4, 7, 7),
    ),
    "conv3d": (
        lambda bias, groups: nn.Conv3d(4, 6, 2, groups=groups, bias=bias),
        nn.BatchNorm3d,
        (2, 4, 4, 4, 4),
    ),
    "convT1d": (
        lambda bias, groups: nn.ConvTranspose1d(4, 6, 3, groups=groups, bias=bias, stride=2),
        nn.BatchNorm1d,
        (3, 4, 5),
    ),
    "convT2d": (
        lambda bias, groups: nn.ConvTranspose2d(
            4, 6, 3, groups=groups, bias=bias, output_padding=1, stride=2
        ),
        nn.BatchNorm2d,
        (3, 4, 5, 5),
    ),
    "convT3d": (
        lambda bias, groups: nn.ConvTranspose3d(4, 6, 2, groups=groups, bias=bias),
        nn.BatchNorm3d,
        (2, 4, 3, 3, 3),
    ),
    "linear": (lambda bias, groups: nn.Linear(4, 6, bias=bias), nn.BatchNorm1d, (5, 4)),
}


@pytest.mark.parametrize(
    ("kind", "groups"), [(k, g) for k in LAYERS for g in (1, 2) if k != "linear" or g == 1]
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_equals_eval_model_and_reference(kind, groups, bias, affine, dtype):
    make_layer, bn_cls, shape = LAYERS[kind]
    torch.manual_seed(0)
    layer = make_layer(bias, groups).to(dtype)
    bn = bn_cls(6, eps=1e-3, affine=affine, dtype=dtype)
    model = randomize_bn(nn.Sequential(layer, bn)).eval()
    x = torch.randn(shape, dtype=dtype) * 2 + 1
    folded, report = fold(model, x, return_report=True)

    assert report.folded == [("0", "1")] and report.left == []
    assert isinstance(folded[1], nn.Identity) and folded[0].weight.dtype == dtype
    z = layer(x).detach()
    expected = reference.forward_inference(
        z.numpy(),
        bn.weight.detach().numpy() if affine else None,
        bn.bias.detach().numpy() if affine else None,
        bn.running_mean.numpy(),
        bn.running_var.numpy(),
        eps=1e-3,
    )
    with torch.no_grad():
        torch.testing.assert_close(folded(x), torch.from_numpy(expected), **TOL[dtype])
    assert report.max_abs_diff <= TOL[dtype]["atol"] + TOL[dtype]["rtol"] * report.max_abs_output


def test_depthwise_and_grouped_transposed_weights():
    """Depthwise conv (groups = channels) and a grouped ConvTranspose whose output channels are
    spread over the weight's second axis in blocks."""
    torch.manual_seed(1)
    for layer, bn in (
        (nn.Conv2d(6, 6, 3, groups=6, padding=1), nn.BatchNorm2d(6)),
        (nn.ConvTranspose2d(6, 9, 3, groups=3), nn.BatchNorm2d(9)),
    ):
        model = randomize_bn(nn.Sequential(layer, bn).double()).eval()
        x = torch.randn(2, 6, 5, 5, dtype=torch.float64)
        with torch.no_grad():
            torch.testing.assert_close(fold(model)(x), model(x), **TOL[torch.float64])


def test_fold_weights_is_the_formula():
    w, b = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    mean, var = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.1
    gamma, beta = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    new_w, new_b = fold_weights(w, b, mean, var, gamma, beta, 1e-5)
    scale = gamma / torch.sqrt(var + 1e-5)
    torch.testing.assert_close(new_w, w * scale[:, None], rtol=1e-12, atol=0)
    torch.testing.assert_close(new_b, (b - mean) * scale + beta, rtol=1e-12, atol=1e-15)
    with pytest.raises(ValueError, match="one entry per output channel"):
        fold_weights(w, b, mean[:2], var[:2], None, None, 1e-5)


def test_requires_grad_dtype_and_original_preserved():
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4))).train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold(model)
    assert not folded.training and model.training
    assert not folded[0].weight.requires_grad and not folded[0].bias.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert isinstance(model[1], nn.BatchNorm2d)
    with pytest.raises(TypeError, match="layer must be"):
        fold_layer(nn.ReLU(), nn.BatchNorm2d(4))


class Residual(nn.Module):
    """conv1 -> bn1 where conv1's output also feeds the skip; conv2 -> bn2 foldable."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv1(x)
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(z)))) + z)


def test_residual_skip_is_not_folded_across():
    model = randomize_bn(Residual()).eval()
    x = torch.randn(2, 4, 6, 6)
    folded, report = fold(model, x, return_report=True)
    assert report.method == "fx" and report.folded == [("conv2", "bn2")]
    assert [name for name, _ in report.left] == ["bn1"] and "also used by" in report.left[0][1]
    assert isinstance(folded.bn1, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.head_bn = nn.BatchNorm1d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float(x.sum()) > 1e9:  # data-dependent control flow: torch.fx cannot trace this
            x = x * 0
        return self.head_bn(self.body(x))


def test_untraceable_model_falls_back_to_sequential_children():
    model = randomize_bn(Untraceable()).eval()
    x = torch.randn(5, 4)
    folded, report = fold(model, x, return_report=True)
    assert report.method == "sequential" and report.folded == [("body.0", "body.1")]
    assert report.left[0][0] == "head_bn" and "does not trace" in report.left[0][1]
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv2(self.bn(self.conv(x))))


@pytest.mark.parametrize(
    ("model", "shape", "reason"),
    [
        (
            nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)),
            (2, 3, 4, 4),
            "track_running_stats",
        ),
        (nn.Sequential(nn.ReLU(), nn.BatchNorm2d(3)), (2, 3, 4, 4), "not from a Conv"),
        (Shared(), (2, 3, 4, 4), "more than one place"),
        (nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5)), (2, 5, 4), "not 2-D"),
    ],
    ids=["no-running-stats", "after-relu", "shared-bn", "linear-3d"],
)
def test_left_alone_with_reason(model, shape, reason):
    model = randomize_bn(model).eval()
    x = torch.randn(shape)
    folded, report = fold(model, x, return_report=True)
    assert report.folded == [] and report.left and all(reason in why for _, why in report.left)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


@pytest.mark.parametrize(
    "bn",
    [
        lambda: BatchNorm2d(6),
        lambda: BatchNormAct2d(6, act="relu"),
        lambda: BatchNormAct2d(6, act="leaky_relu", negative_slope=0.2),
        lambda: GhostBatchNorm2d(6, virtual_batch_size=2),
        lambda: BatchRenorm2d(6),
        lambda: FrozenBatchNorm2d(6),
    ],
    ids=["batchnorm", "act-relu", "act-leaky", "ghost", "renorm", "frozen"],
)
def test_our_modules_fold(bn):
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3), bn(), nn.Conv2d(6, 2, 1))).eval()
    x = torch.randn(4, 3, 6, 6)
    folded, report = fold(model, x, return_report=True)
    assert report.folded == [("0", "1")]
    assert not any(batchnorm.tools.convert.is_batchnorm(m) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), **TOL[torch.float32])


def test_mlp_with_our_modules_and_tuple_output():
    class TwoHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(5, 7), BatchNorm1d(7)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            y = self.bn(self.fc(x))
            return y, y.sum(dim=1)

    model = randomize_bn(TwoHeads()).eval()
    x = torch.randn(8, 5, dtype=torch.float32)
    folded, report = fold(model, x, return_report=True)
    assert report.folded == [("fc", "bn")] and report.max_abs_diff < 1e-4
    with torch.no_grad():
        for a, b in zip(folded(x), model(x), strict=True):
            torch.testing.assert_close(a, b, **TOL[torch.float32])
    assert "folded 1 BN layer" in str(report)


def test_errors_and_top_level_name():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        fold("not a model")  # type: ignore[call-overload]
    assert batchnorm.fold is fold
