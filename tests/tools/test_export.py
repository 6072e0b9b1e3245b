"""Export: batchnorm.nn models in eval mode go through torch.export and ONNX (onnxruntime runs
them with torch's outputs); folded models export as Conv/Gemm only."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import batchnorm
import batchnorm.nn as bnn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

# torch's own exporter trips over a deprecation inside torch.utils._pytree (not our code).
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        bnn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
        bnn.BatchNorm1d(10),
    )
    model.train()
    for _ in range(3):
        model(torch.randn(16, 3, 6, 6) * 2 + 1)
    return model.eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(1))


def run_onnx(module: nn.Module, x: torch.Tensor, path, optimize: bool) -> tuple[list[str], torch.Tensor]:
    torch.onnx.export(module, (x,), str(path), optimize=optimize, verbose=False)
    ops = [node.op_type for node in onnx.load(str(path)).graph.node]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return ops, torch.from_numpy(out)


@pytest.mark.slow
def test_onnx_has_standard_batchnorm_nodes_and_runs(model, x, tmp_path):
    ops, out = run_onnx(model, x, tmp_path / "bn.onnx", optimize=False)
    assert ops.count("BatchNormalization") == 2, ops
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_onnx_of_folded_model_is_conv_and_gemm_only(model, x, tmp_path):
    folded = batchnorm.fold(model, x)
    ops, out = run_onnx(folded, x, tmp_path / "folded.onnx", optimize=False)
    assert "BatchNormalization" not in ops and "Conv" in ops and "Gemm" in ops, ops
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["batchnorm", "folded", "frozen"])
def test_torch_export(model, x, variant):
    module = {
        "batchnorm": lambda: model,
        "folded": lambda: batchnorm.fold(model),
        "frozen": lambda: batchnorm.freeze(copy.deepcopy(model)),  # in place: keep the fixture
    }[variant]()
    program = torch.export.export(module, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    has_bn = any("batch_norm" in t for t in targets)
    assert has_bn == (variant == "batchnorm"), targets
    if variant == "frozen":
        assert isinstance(module[1], bnn.FrozenBatchNorm2d)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
