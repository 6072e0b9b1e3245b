"""The per-shape suite: every implementation x mode on every case, interleaved, as plain data."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from batchnorm.bench import timing
from batchnorm.bench.suite import IMPLEMENTATIONS, MODES, Case, bound_seconds, make_inputs


def run_suite(
    cases: Sequence[Case],
    implementations: Sequence[str],
    modes: Sequence[str] = MODES,
    repeats: int = 15,
    bandwidth: float | None = None,
    progress: Any = None,
) -> dict[str, Any]:
    """Measure; returns ``{"bandwidth", "results": [...], "geomean": {...}, "skipped": [...]}``.

    Each result row: case, mode, bytes, bound, median seconds per implementation, speed-up
    against the implementation's baseline (baseline time / its time) and fraction of the bound.
    """
    bandwidth = bandwidth or timing.copy_bandwidth()
    results, skipped = [], []
    for case in cases:
        inputs = make_inputs(case)
        for mode in modes:
            calls = {}
            for name in implementations:
                try:
                    calls[name] = IMPLEMENTATIONS[name].factory(case, inputs, mode)
                except (ImportError, NotImplementedError, AttributeError) as err:
                    skipped.append(
                        {
                            "implementation": name,
                            "case": case.label,
                            "mode": mode,
                            "reason": f"{type(err).__name__}: {err}",
                        }
                    )
            samples = timing.interleaved(calls, repeats)
            med = {name: timing.median(s) for name, s in samples.items()}
            bound = bound_seconds(case, mode, bandwidth)
            results.append(
                {
                    "shape": list(case.shape),
                    "dtype": case.dtype,
                    "layout": case.layout,
                    "label": case.label,
                    "mode": mode,
                    "bytes": case.nbytes,
                    "bound_s": bound,
                    "median_s": med,
                    "samples_s": samples,
                    "speedup": {
                        n: med[IMPLEMENTATIONS[n].baseline] / t
                        for n, t in med.items()
                        if IMPLEMENTATIONS[n].baseline in med
                    },
                    "fraction_of_bound": {n: bound / t for n, t in med.items()},
                }
            )
            if progress is not None:
                progress()
    return {
        "bandwidth_Bps": bandwidth,
        "repeats": repeats,
        "results": results,
        "geomean": geomeans(results),
        "skipped": skipped,
    }


def geomeans(results: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per mode and implementation: geometric mean of the speed-ups over the cases."""
    out: dict[str, dict[str, float]] = {}
    for row in results:
        for name, s in row["speedup"].items():
            out.setdefault(row["mode"], {}).setdefault(name, []).append(s)  # type: ignore[arg-type]
    return {
        mode: {n: math.exp(sum(map(math.log, v)) / len(v)) for n, v in by.items()}  # type: ignore[arg-type]
        for mode, by in out.items()
    }
