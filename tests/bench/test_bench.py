"""`batchnorm bench`: the implementation table computes BN, the CLI writes its JSON and plot.

No test here asserts a speed: timings on a shared CI machine mean nothing.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from batchnorm import cli, reference
from batchnorm.bench import model
from batchnorm.bench.suite import (
    IMPLEMENTATIONS,
    MODES,
    TRAFFIC,
    Case,
    bound_seconds,
    make_inputs,
    parse_shapes,
)


def test_parse_shapes_prefixes_and_errors():
    cases = parse_shapes("16x64x8x8, 256x1024,cl:2x3x4x4,f64:cl:2x3x4x5")
    assert cases == [
        Case((16, 64, 8, 8)),
        Case((256, 1024)),
        Case((2, 3, 4, 4), "f32", "cl"),
        Case((2, 3, 4, 5), "f64", "cl"),
    ]
    assert cases[3].label == "cl:f64:2x3x4x5" and cases[3].nbytes == 2 * 3 * 4 * 5 * 8
    for bad, match in [
        ("16x", "integers"),
        ("xx:4x4", "unknown prefix"),
        ("cl:4x4", "channels-last"),
        ("4", "at least"),
        ("", "no shape"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse_shapes(bad)


def test_bound_counts_the_documented_traffic():
    case = Case((10, 10))  # 400 bytes
    assert [bound_seconds(case, m, 400.0) for m in MODES] == [3.0, 2.0, 8.0]


def _expected(x: np.ndarray, dy: np.ndarray, mode: str, act: str):
    if mode == "eval":  # fresh modules: running mean 0, running var 1
        c = x.shape[1]
        z = reference.forward_inference(x, None, None, np.zeros(c), np.ones(c))
        return np.maximum(z, 0) if act == "relu" else z, None
    z, cache = reference.forward(x, None, None)
    if act == "relu":
        dy = dy * (z > 0)
        z = np.maximum(z, 0)
    return z, reference.backward_compact(dy, cache)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ["6x5x4x3", "cl:6x5x4x3", "40x7", "f64:6x5x9"])
@pytest.mark.parametrize("name", list(IMPLEMENTATIONS))
def test_every_implementation_computes_batch_norm(name, shape, mode):
    """What the benchmark times is correct: the same table, checked against the reference."""
    (case,) = parse_shapes(shape)
    inputs = make_inputs(case)
    impl = IMPLEMENTATIONS[name]
    try:
        call = impl.factory(case, inputs, mode)
    except ImportError as err:  # another layer not installed in this checkout
        pytest.skip(str(err))
    out = call()
    y, dx = out if mode == "train_bwd" else (out, None)
    x64, dy64 = inputs.x.double().numpy(), inputs.dy.double().numpy()
    y_ref, dx_ref = _expected(x64, dy64, mode, impl.act)
    atol = 1e-10 if case.dtype == "f64" else 1e-4
    np.testing.assert_allclose(np.asarray(y.detach() if torch.is_tensor(y) else y), y_ref, atol=atol)
    if dx is not None:
        np.testing.assert_allclose(np.asarray(dx.detach() if torch.is_tensor(dx) else dx), dx_ref, atol=atol)


def test_cli_smoke_writes_json_and_png(tmp_path, capsys):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = cli.main(
        [
            "bench",
            "--shapes",
            "4x3x5x5,cl:2x3x4x4",
            "--repeats",
            "2",
            "--threads",
            "1",
            "--impls",
            "torch,batchnorm-act,numpy,torch+relu",
            "--json",
            str(out_json),
            "--plot",
            str(out_png),
        ]
    )
    assert rc == 0
    data = json.loads(out_json.read_text())
    assert {"machine", "config", "suite"} <= set(data)
    assert data["machine"]["cpu"] and data["config"]["repeats"] == 2 and data["config"]["threads"] == 1
    suite = data["suite"]
    # one copy measurement before each of the two shapes; the bound uses their median
    samples = suite["bandwidth_samples_Bps"]
    assert len(samples) == 2 and min(samples) <= suite["bandwidth_Bps"] <= max(samples)
    for row in suite["results"]:
        expected_bound = TRAFFIC[row["mode"]] * row["bytes"] / suite["bandwidth_Bps"]
        assert row["bound_s"] == pytest.approx(expected_bound)
        assert row["fraction_of_bound"]["torch"] == pytest.approx(expected_bound / row["median_s"]["torch"])
    assert len(suite["results"]) == 2 * len(MODES)
    for row in suite["results"]:
        assert set(row["median_s"]) == {"torch", "batchnorm-act", "numpy", "torch+relu"}
        assert all(len(s) == 2 for s in row["samples_s"].values())
        assert row["speedup"]["torch"] == 1.0
        ratio = row["median_s"]["torch+relu"] / row["median_s"]["batchnorm-act"]
        assert row["speedup"]["batchnorm-act"] == pytest.approx(ratio)
        assert row["fraction_of_bound"]["torch"] == pytest.approx(row["bound_s"] / row["median_s"]["torch"])
    assert set(suite["geomean"]) == set(MODES)
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "AMD" in printed or "machine" in printed
    assert "geometric mean" in printed


@pytest.mark.parametrize("number, expected", [("3", {3}), ("auto", None)])
def test_cli_samples_of_several_calls(number, expected, tmp_path, capsys):
    out_json = tmp_path / "r.json"
    argv = ["bench", "--shapes", "8x4", "--modes", "eval", "--repeats", "2", "--impls", "torch,batchnorm"]
    assert cli.main([*argv, "--number", number, "--json", str(out_json)]) == 0
    data = json.loads(out_json.read_text())
    (row,) = data["suite"]["results"]
    counts = {row["calls_per_sample"]}
    assert counts == expected if expected else 1 <= row["calls_per_sample"] <= 1000
    assert data["suite"]["number"] == (int(number) if number.isdigit() else number)
    assert all(len(s) == 2 for s in row["samples_s"].values())
    # the allocator state the run was measured in is part of the record
    assert data["machine"]["allocator"] and data["config"]["allocator"] == "steady"
    printed = capsys.readouterr().out
    assert "ms per call" in printed and "calls/sample" in printed


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--shapes", "4x3", "--impls", "torch,tensorflow", "--repeats", "1"], "--impls: unknown"),
        (["--repeats", "0"], "--repeats: expected a positive integer, got 0"),
        (["--threads", "0"], "--threads: expected a positive integer, got 0"),
        (["--shapes", "16x64x56x56cl"], "--shapes: '16x64x56x56cl' is not like"),
        (["--modes", "train,infer"], "--modes: unknown"),
        (["--model", "--batch", "0"], "--batch: expected a positive integer, got 0"),
        (["--fold", "--width", "-1"], "--width: expected a positive integer, got -1"),
        (["--number", "0"], "--number: expected a positive integer or 'auto', got '0'"),
        (["--number", "fast"], "--number: expected a positive integer or 'auto', got 'fast'"),
    ],
)
def test_cli_rejects_bad_options_with_a_message_not_a_traceback(argv, message, capsys):
    with pytest.raises(SystemExit) as ended:
        cli.main(["bench", *argv])
    assert str(ended.value.code).startswith(f"batchnorm bench: {message}")
    assert "machine" not in capsys.readouterr().out  # nothing was measured or printed first


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_device_cuda_without_gpu_says_so(capsys):
    assert cli.main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().out


def test_model_variants_agree_and_save_memory_saves():
    """The --model network: same forward for every BN variant; save_memory holds less."""
    x = torch.randn(4, 3, 32, 32)
    outputs = {}
    for variant in (*model.VARIANTS, "act-save-memory"):
        torch.manual_seed(0)
        net = model.resnet18(variant, width=4)
        if variant == "act-save-memory":  # leaky_relu there: compare it with itself only
            continue
        outputs[variant] = net(x)
    torch.testing.assert_close(outputs["batchnorm"], outputs["torch"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outputs["act"], outputs["torch"], rtol=1e-4, atol=1e-5)
    saved = {v: model.saved_activation_bytes(v, width=4, batch=4) for v in ("act", "act-save-memory")}
    assert 0 < saved["act-save-memory"] < saved["act"]
    step = model.training_step("act", width=4, batch=4)
    assert np.isfinite(step())
