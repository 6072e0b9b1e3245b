"""Results -> terminal tables (rich), JSON and a bar chart (matplotlib). No measuring here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

BASELINES = ("torch", "torch+relu")  # what the others' speed-ups are measured against
MODE_TITLES = {"train": "training forward", "eval": "eval forward", "train_bwd": "training forward+backward"}


# column headers: short enough for the table to fit a 160-column terminal
SHORT = {
    "torch": "torch",
    "batchnorm": "bn",
    "numpy": "numpy",
    "torch+relu": "torch+relu",
    "batchnorm-act": "bn-act",
}


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.3f}"


def suite_tables(suite: dict[str, Any]) -> list[Any]:
    """One rich table per mode: times (ms), speed-ups, % of the memory-traffic bound."""
    from rich.table import Table

    tables = []
    for mode, title in MODE_TITLES.items():
        rows = [r for r in suite["results"] if r["mode"] == mode]
        if not rows:
            continue
        names = list(rows[0]["median_s"])
        # samples of several consecutive calls (--number): their count per row
        counts = any(r.get("calls_per_sample", 1) != 1 for r in rows)
        unit = "ms per call" if counts else "ms"
        table = Table(title=f"{title} (median of {suite['repeats']}, {unit})")
        table.add_column("shape")
        if counts:
            table.add_column("calls/sample", justify="right")
        table.add_column("MB", justify="right")
        table.add_column("bound", justify="right")
        for n in names:
            table.add_column(SHORT.get(n, n), justify="right")
        speedups = [n for n in names if n not in BASELINES]
        for n in speedups:
            table.add_column(f"{SHORT.get(n, n)} x", justify="right")
        for n in ("torch", "batchnorm", "batchnorm-act"):
            if n in names:
                table.add_column(f"{SHORT[n]} %bnd", justify="right")
        for r in rows:
            cells = [r["label"], *([str(r.get("calls_per_sample", 1))] if counts else [])]
            cells += [f"{r['bytes'] / 1e6:.1f}", _ms(r["bound_s"])]
            cells += [_ms(r["median_s"].get(n)) for n in names]
            cells += [f"{r['speedup'][n]:.2f}x" if n in r["speedup"] else "-" for n in speedups]
            cells += [
                f"{100 * r['fraction_of_bound'][n]:.0f}%"
                for n in ("torch", "batchnorm", "batchnorm-act")
                if n in names
            ]
            table.add_row(*cells)
        geo = suite["geomean"].get(mode, {})
        table.add_row(
            "geometric mean",
            *([""] if counts else []),
            "",
            "",
            *([""] * len(names)),
            *[f"{geo[n]:.2f}x" if n in geo else "-" for n in speedups],
            *([""] * sum(n in names for n in ("torch", "batchnorm", "batchnorm-act"))),
            style="bold",
        )
        tables.append(table)
    return tables


def simple_table(title: str, rows: list[dict[str, Any]]) -> Any:
    """A rich table from a list of flat dicts (model, startup, fold, sync modes)."""
    from rich.table import Table

    table = Table(title=title)
    columns = list(rows[0]) if rows else []
    for c in columns:
        table.add_column(c, justify="left" if c == columns[0] else "right")
    for r in rows:
        table.add_row(*[f"{v:.4g}" if isinstance(v, float) else str(v) for v in (r[c] for c in columns)])
    return table


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(payload, indent=2, default=str))


def plot(path: str | Path, suite: dict[str, Any]) -> None:
    """Bar chart: speed-up over torch.nn per shape and mode, and fraction of the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    modes = [m for m in MODE_TITLES if any(r["mode"] == m for r in suite["results"])]
    labels = list(dict.fromkeys(r["label"] for r in suite["results"]))
    fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.1 * len(labels)), 7), sharex=True)
    width = 0.8 / max(1, len(modes))
    pos = np.arange(len(labels))
    for i, mode in enumerate(modes):
        rows = {r["label"]: r for r in suite["results"] if r["mode"] == mode}
        speed = [rows[lb]["speedup"].get("batchnorm", np.nan) if lb in rows else np.nan for lb in labels]
        frac = [
            rows[lb]["fraction_of_bound"].get("batchnorm", np.nan) if lb in rows else np.nan for lb in labels
        ]
        axes[0].bar(pos + i * width, speed, width, label=MODE_TITLES[mode])
        axes[1].bar(pos + i * width, np.asarray(frac) * 100, width, label=MODE_TITLES[mode])
    axes[0].axhline(1.0, color="black", lw=0.8)
    axes[0].set_ylabel("speed-up over torch.nn (x)")
    axes[1].axhline(100, color="black", lw=0.8)
    axes[1].set_ylabel("batchnorm: % of memory-traffic bound")
    axes[1].set_xticks(pos + width * (len(modes) - 1) / 2, labels, rotation=30, ha="right")
    axes[0].legend()
    axes[0].set_title("batchnorm vs torch.nn (CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
