"""One plotting style for every lab figure: matplotlib's Agg backend, shared colours and labels.

Experiments build their figures with :func:`figure` and write them with :func:`save`, so every
plot has a title, labelled axes, a legend, the same colours for the same norm, and the same size.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: the lab must run headless (CI, ssh)

import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["COLORS", "LABELS", "figure", "label", "save"]

# The same norm has the same colour and name in every figure.
COLORS = {
    "bn": "#1f77b4",
    "none": "#d62728",
    "group": "#2ca02c",
    "ghost": "#9467bd",
    "renorm": "#ff7f0e",
    "before": "#7f7f7f",
    "after": "#1f77b4",
}
LABELS = {
    "bn": "with BN",
    "none": "without BN",
    "group": "GroupNorm",
    "ghost": "Ghost BN",
    "renorm": "Batch Renorm",
}

_STYLE = {
    "figure.dpi": 100,
    "savefig.dpi": 110,
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.titleweight": "bold",
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.frameon": False,
    "lines.linewidth": 1.8,
}


def label(kind: str) -> str:
    return LABELS.get(kind, kind)


def figure(
    title: str, panels: list[tuple[str, str, str]], *, width: float = 5.0, height: float = 3.6
) -> tuple[Any, list[Any]]:
    """A figure with one axes per ``(panel title, x label, y label)`` side by side, and a suptitle."""
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), height), squeeze=False)
    axes = list(axes[0])
    for ax, (panel_title, xlabel, ylabel) in zip(axes, panels, strict=True):
        with plt.rc_context(_STYLE):
            ax.set_title(panel_title)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.spines["top"].set_visible(False)
            ax.spines["right"].set_visible(False)
    fig.suptitle(title, fontsize=12, fontweight="bold")
    return fig, axes


def save(fig: Any, path: str | Path) -> Path:
    """Add legends where there are labelled artists, lay out, write the PNG, close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for ax in fig.axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(frameon=False, fontsize=9)
    fig.tight_layout()
    with plt.rc_context(_STYLE):
        # "tight" grows the canvas to the suptitle, which is wider than a single panel.
        fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
