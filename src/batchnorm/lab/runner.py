"""Run experiments, plot them, write the report and print the summary: shared by ``batchnorm
demo`` and ``batchnorm lab``."""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.console import Console

from batchnorm.lab.console import claims_table, progress_bars
from batchnorm.lab.report import jsonable, write_report
from batchnorm.lab.train import set_threads

__all__ = ["describe", "run_experiments"]


def describe(module: Any) -> str:
    """An experiment's description in plain words: its module docstring, unwrapped."""
    return " ".join((module.__doc__ or "").split())


def run_experiments(
    plan: list[tuple[str, Any]],
    out_dir: str | Path,
    *,
    title: str,
    threads: int = 1,
    progress: bool = True,
    console: Console | None = None,
) -> list[dict]:
    """Run each ``(module name, config)``, write PNGs + results.json + index.html into ``out_dir``.

    Prints each effective configuration first and the summary table last; returns the claims.
    """
    console = console or Console()
    set_threads(threads)
    out = Path(out_dir)
    sections = []
    start = time.perf_counter()
    for module_name, config in plan:
        module = importlib.import_module(module_name)
        console.print(f"[bold]{module.NAME}[/bold] {json.dumps(jsonable(asdict(config)))}")
        with progress_bars(console, enabled=progress) as bars:
            results = module.run(config, bars)
        pngs = module.plot(results, out)
        sections.append(
            {
                "name": module.NAME,
                "title": module.TITLE,
                "description": describe(module),
                "pngs": pngs,
                "claims": module.claims(results),
                "results": results,
            }
        )
    elapsed = time.perf_counter() - start
    index = write_report(out, title, sections, elapsed_s=round(elapsed, 1))
    claims = [c for s in sections for c in s["claims"]]
    console.print(claims_table(claims))
    console.print(f"report: {index} ({elapsed:.0f} s)")
    return claims
