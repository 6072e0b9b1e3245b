"""``batchnorm ddp`` end to end (2 gloo processes) and the bench hook measure_sync_overhead."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_ddp_command_end_to_end(tmp_path, capsys):
    from batchnorm.cli import main

    out = tmp_path / "ddp.json"
    assert main(["ddp", "--steps", "20", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "SyncBatchNorm" in printed and "per-process" in printed
    saved = json.loads(out.read_text())
    assert saved["config"]["steps"] == 20 and saved["config"]["procs"] == 2
    local, sync = saved["results"]["local"], saved["results"]["sync"]
    assert len(local) == len(sync) == 2
    # per-process BN: the ranks' running statistics differ; SyncBatchNorm: identical
    assert all(r["spread"] > 1e-3 for r in local)
    assert all(r["spread"] == 0.0 for r in sync)
    # distribute_bn makes them agree in both cases, and then every rank evaluates the same
    assert all(r["spread_after"] < 1e-6 for r in local + sync)
    assert len({r["accuracy_after"] for r in local}) == 1
    assert len({r["accuracy"] for r in sync}) == 1
    assert all(0.0 <= r["accuracy"] <= 1.0 and r["loss"] > 0 for r in local + sync)


@pytest.mark.slow
def test_measure_sync_overhead():
    from batchnorm.lab.ddp import measure_sync_overhead

    result = measure_sync_overhead(shape=(4, 8, 6, 6), iters=5)
    assert result["world_size"] == 2 and result["shape"] == (4, 8, 6, 6)
    assert result["local_ms"] > 0 and result["sync_ms"] > 0
    assert result["ratio"] == pytest.approx(result["sync_ms"] / result["local_ms"])


def test_bad_arguments():
    from batchnorm.lab.ddp import measure_sync_overhead, run_distributed

    with pytest.raises(ValueError, match="world_size"):
        run_distributed(print, 0)
    with pytest.raises(ValueError, match="shape"):
        measure_sync_overhead(shape=(4, 8))
