"""convert: swapping BN kinds keeps parameters, buffers, device, dtype, flags and outputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.nn as bnn
from batchnorm.tools.convert import batchnorm_modules, bn_dim, convert

TOL = dict(rtol=1e-5, atol=1e-5)


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4, momentum=0.3, eps=1e-3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, 6),
        nn.BatchNorm1d(6, affine=False),
    ).to(dtype)
    model.train()
    for _ in range(3):  # running statistics away from their initial values
        model(torch.randn(8, 3, 6, 6, dtype=dtype) * 2 + 1)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 2.0)
        model[1].bias.uniform_(-1.0, 1.0)
    return model


# kind -> (extra kwargs, class expected for the 2d layer, train-mode output equal to torch's)
KINDS = {
    "batchnorm": ({}, bnn.BatchNorm2d, True),
    "frozen": ({}, bnn.FrozenBatchNorm2d, False),
    "sync": ({}, bnn.SyncBatchNorm, True),
    "ghost": ({"virtual_batch_size": 4}, bnn.GhostBatchNorm2d, False),
    "renorm": ({}, bnn.BatchRenorm2d, False),
}


@pytest.mark.filterwarnings("ignore:SyncBatchNorm. no torch.distributed process group:UserWarning")
@pytest.mark.parametrize("kind", list(KINDS))
def test_round_trip_keeps_outputs_and_state(kind):
    kwargs, cls, same_train = KINDS[kind]
    model = make_model()
    x = torch.randn(8, 3, 6, 6) * 2 + 1
    original = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    with torch.no_grad():
        expected_eval = model.eval()(x)
    model.train()
    converted = convert(model, kind, **kwargs)
    assert converted is model and type(model[1]) is cls and model[1].training
    assert model[1].eps == 1e-3 and model[1].running_mean.dtype == torch.float32
    if kind != "frozen":
        assert model[1].weight is weight and model[1].momentum == 0.3  # same tensors: optimizers keep working
        assert model[5].affine is False
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), expected_eval, **TOL)
    if same_train:
        reference = make_model()
        with torch.no_grad():
            torch.testing.assert_close(model.train()(x), reference(x), **TOL)
        torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, **TOL)
        model.load_state_dict(original)

    model.train()
    if kind == "sync":  # SyncBatchNorm takes any rank: the way back needs each layer's dimension
        with pytest.raises(ValueError, match="dim=1, 2 or 3"):
            convert(model, "torch")
        model[1], model[5] = convert(model[1], "torch", dim=2), convert(model[5], "torch", dim=1)
        back = model
    else:
        back = convert(model, "torch")
    assert type(back[1]) is nn.BatchNorm2d and back[1].training
    with torch.no_grad():
        torch.testing.assert_close(back.eval()(x), expected_eval, **TOL)


def test_float64_and_shared_instances():
    shared = nn.BatchNorm1d(5).double()
    model = nn.Sequential(nn.Linear(5, 5).double(), shared, nn.Linear(5, 5).double(), shared)
    convert(model, "batchnorm")
    assert model[1] is model[3] and isinstance(model[1], bnn.BatchNorm1d)
    assert model[1].running_var.dtype == torch.float64
    assert len(batchnorm_modules(model)) == 1


def test_top_level_bn_returns_the_new_module():
    bn = nn.BatchNorm3d(4).eval()
    new = convert(bn, "batchnorm")
    assert isinstance(new, bnn.BatchNorm3d) and not new.training
    assert convert(new, "batchnorm") is new  # already that kind
    assert bn_dim(new) == 3 and bn_dim(bnn.SyncBatchNorm(3)) is None


def test_errors_leave_the_model_untouched():
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm3d(3))
    with pytest.raises(ValueError, match="2d modules only|1d, 2d"):
        convert(model, "ghost", virtual_batch_size=2)
    assert type(model[0]) is nn.BatchNorm2d  # nothing swapped before the error
    with pytest.raises(ValueError, match="virtual_batch_size"):
        convert(model, "ghost")
    with pytest.raises(ValueError, match="to must be one of"):
        convert(model, "layernorm")
    with pytest.raises(ValueError, match="dim must be"):
        convert(model, "torch", dim=4)
    with pytest.raises(ValueError, match="track_running_stats=False"):
        convert(nn.Sequential(nn.BatchNorm2d(3, track_running_stats=False)), "renorm")
    act = nn.Sequential(bnn.BatchNormAct2d(3, act="relu"))
    with pytest.raises(ValueError, match="fused activation"):
        convert(act, "torch")
    assert isinstance(act[0], bnn.BatchNormAct2d)


def test_identity_activation_converts_and_top_level_name():
    model = nn.Sequential(bnn.BatchNormAct2d(3, act="identity"))
    convert(model, "torch")
    assert type(model[0]) is nn.BatchNorm2d
    assert batchnorm.convert is convert
