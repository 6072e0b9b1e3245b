"""Models, the norm-layer factory and the training loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchnorm.lab import models
from batchnorm.lab.data import mnist1d
from batchnorm.lab.train import accuracy, batches, train


@pytest.mark.parametrize("kind", ["bn", "none", "group", "ghost", "renorm"])
def test_norm_layer_kinds_run_on_a_batch(kind):
    layer = models.norm_layer(kind, 8, 1, virtual_batch_size=4)
    x = torch.randn(16, 8, dtype=torch.float64) * 3 + 2
    y = layer.double()(x)
    assert y.shape == x.shape
    if kind in ("bn", "ghost", "renorm"):  # batch statistics in training: standardized per feature
        chunk = y[:4] if kind == "ghost" else y
        torch.testing.assert_close(chunk.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-6, rtol=0)


def test_batch_norm_matches_torch_in_train_and_eval():
    ours, ref = models.batch_norm(6, 1).double(), torch.nn.BatchNorm1d(6).double()
    x = torch.randn(32, 6, dtype=torch.float64) * 2 + 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.running_var, ref.running_var, rtol=1e-10, atol=1e-10)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-10, atol=1e-10)


def test_norm_layer_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        models.norm_layer("layer", 4)


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_mlp_layout_and_init(norm):
    torch.manual_seed(0)
    mlp = models.MLP(784, 10, (100, 100, 100), norm=norm, init_scale=2.0)
    assert len(mlp.activations) == 3 and len(mlp.linears) == 4
    assert (mlp.linears[0].bias is None) == (norm == "bn")  # BN's beta replaces the bias
    assert abs(float(mlp.linears[0].weight.detach().std()) - 2.0 / 28) < 0.005
    assert mlp(torch.randn(5, 1, 28, 28)).shape == (5, 10)


@pytest.mark.parametrize("dim,shape", [(1, (4, 1, 40)), (2, (4, 1, 28, 28))])
@pytest.mark.parametrize("norm", ["bn", "none", "group"])
def test_resnet_shapes(dim, shape, norm):
    net = models.ResNet(1, 10, width=4, stages=2, norm=norm, dim=dim)
    assert net(torch.randn(*shape)).shape == (4, 10)


def test_batches_cover_each_epoch_without_repeats():
    rng = np.random.default_rng(0)
    got = list(batches(10, 3, 7, rng))
    assert len(got) == 7 and all(len(b) == 3 for b in got)
    assert len(set(np.concatenate(got[:3]).tolist())) == 9  # one epoch: 3 disjoint batches


def test_train_is_deterministic_and_learns():
    data = mnist1d(1000, seed=0)

    def once() -> list[float]:
        torch.manual_seed(0)
        model = models.MLP(data.num_features, 10, (32,), activation="relu", norm="bn")
        return train(model, data, steps=150, batch_size=32, lr=0.1, seed=1, eval_every=50).test_accuracy

    a, b = once(), once()
    assert a == b and len(a) == 4
    assert a[-1] > 0.2  # well above chance (0.1) after 150 steps


def test_train_stops_on_divergence():
    data = mnist1d(200, seed=0)
    torch.manual_seed(0)
    model = models.MLP(data.num_features, 10, (16,), activation="relu", norm="none", init_scale=10.0)
    history = train(model, data, steps=50, batch_size=16, lr=1e6, eval_every=10)
    assert history.diverged_at is not None
    assert history.final_accuracy == pytest.approx(0.1)
    assert history.steps[-1] == 50


def test_accuracy_counts_correct_predictions():
    model = torch.nn.Flatten()  # logits = the inputs themselves
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]][:, None, :]
    assert accuracy(model, x, np.array([0, 1, 0, 0]), batch_size=3) == pytest.approx(0.75)
