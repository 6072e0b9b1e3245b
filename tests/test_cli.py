"""The ``batchnorm`` command: version, info, help of every subcommand."""

from __future__ import annotations

import json

import pytest

import batchnorm
from batchnorm.cli import COMMANDS, main


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"batchnorm {batchnorm.__version__}"


def test_no_command_prints_help(capsys):
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_info_json_names_versions_threads_and_kernels(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["batchnorm"] == batchnorm.__version__
    assert info["versions"]["torch"].startswith("2.")
    assert info["threads"] >= 1
    assert info["output_buffer_cache_mib"] == batchnorm.kernels.cache_limit() >> 20
    layouts = {row["layout"] for row in info["kernels"]}
    assert len(info["kernels"]) >= 3 and len(layouts) >= 2


def test_info_table(capsys):
    assert main(["info"]) == 0
    assert "Kernel dispatch" in capsys.readouterr().out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_subcommand_has_its_own_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"batchnorm {command}" in capsys.readouterr().out
