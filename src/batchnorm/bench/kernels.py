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
    number: int | str = 1,
) -> dict[str, Any]:
    """Measure; returns ``{"bandwidth", "results": [...], "geomean": {...}, "skipped": [...]}``.

    Each result row: case, mode, bytes, bound, median seconds per implementation, speed-up
    against the implementation's baseline (baseline time / its time) and fraction of the bound.

    Without a given ``bandwidth`` the copy bandwidth is measured before every case and the
    bound uses their median: on a shared machine one measurement is a snapshot (six in a row,
    seconds apart, gave 29.6-49.3 GB/s here), and the run's phases should all count.

    ``number``: consecutive calls per timed sample (``timing.interleaved``), or ``"auto"`` for
    about 1 ms of the fastest implementation per sample, chosen per case and mode (recorded in
    each row as ``calls_per_sample``).
    """
    samples_bps: list[float] = []
    results, skipped, row_cases = [], [], []
    for case in cases:
        if bandwidth is None:
            samples_bps.append(timing.copy_bandwidth())
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
            per_sample = timing.calls_per_sample(calls) if number == "auto" else int(number)
            samples = timing.interleaved(calls, repeats, number=per_sample)
            med = {name: timing.median(s) for name, s in samples.items()}
            results.append(
                {
                    "shape": list(case.shape),
                    "dtype": case.dtype,
                    "layout": case.layout,
                    "label": case.label,
                    "mode": mode,
                    "bytes": case.nbytes,
                    "calls_per_sample": per_sample,
                    "median_s": med,
                    "samples_s": samples,
                    "speedup": {
                        n: med[IMPLEMENTATIONS[n].baseline] / t
                        for n, t in med.items()
                        if IMPLEMENTATIONS[n].baseline in med
                    },
                }
            )
            row_cases.append(case)
            if progress is not None:
                progress()
    bandwidth = bandwidth or (timing.median(samples_bps) if samples_bps else timing.copy_bandwidth())
    for row, case in zip(results, row_cases, strict=True):
        row["bound_s"] = bound = bound_seconds(case, row["mode"], bandwidth)
        row["fraction_of_bound"] = {n: bound / t for n, t in row["median_s"].items()}
    return {
        "bandwidth_Bps": bandwidth,
        "bandwidth_samples_Bps": samples_bps,
        "repeats": repeats,
        "number": number,
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
