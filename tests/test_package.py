"""The package's import boundary: the core needs NumPy alone; heavy layers load on use."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_HEAVY = textwrap.dedent(
    """
    import sys
    for name in ("torch", "numba", "matplotlib", "triton", "rich"):
        sys.modules[name] = None  # any import of these now raises ImportError
    """
)


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_core_imports_and_runs_with_heavy_layers_blocked():
    result = _run(
        """
        import numpy as np
        import batchnorm
        from batchnorm import reference
        x = np.random.default_rng(0).normal(size=(8, 3, 4))
        y, cache = reference.forward(x, None, None)
        dx, dgamma, dbeta = reference.backward(np.ones_like(x), cache)
        assert np.allclose(y.mean(axis=(0, 2)), 0) and np.allclose(dx, 0, atol=1e-12)
        print(batchnorm.__version__)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __import__("batchnorm").__version__


def test_import_batchnorm_loads_no_heavy_module():
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, batchnorm; "
            "print(sorted(m for m in ('torch', 'numba', 'matplotlib', 'triton') if m in sys.modules))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_unknown_attribute_names_the_package():
    import batchnorm

    try:
        batchnorm.not_a_name  # noqa: B018
    except AttributeError as error:
        assert "batchnorm" in str(error) and "not_a_name" in str(error)
    else:
        raise AssertionError("expected AttributeError")


def test_every_lazy_name_resolves():
    import batchnorm
    import batchnorm.nn

    for name in batchnorm.__all__:
        assert getattr(batchnorm, name) is not None, name
    for name in batchnorm.nn.__all__:
        assert isinstance(getattr(batchnorm.nn, name), type), name
