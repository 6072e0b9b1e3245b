"""The lab's report: results.json (results with their effective configuration) and a
self-contained index.html (every PNG embedded as base64 data, so the file opens anywhere)."""

from __future__ import annotations

import base64
import html
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

__all__ = ["jsonable", "write_report"]


def jsonable(value: Any) -> Any:
    """``value`` with tuples as lists and non-finite floats as None (strict JSON has no NaN)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str):  # NumPy scalars
        return jsonable(value.item())
    return value


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } .meta { color: #666; font-size: 0.9em; }
table { border-collapse: collapse; margin: 1em 0; } td, th { border: 1px solid #ccc; padding: 0.4em 0.7em; }
th { background: #f3f3f3; text-align: left; } .yes { color: #1a7f37; font-weight: bold; }
.no { color: #cf222e; font-weight: bold; } img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
section { margin-top: 2.5em; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
"""


def _claims_html(claims: list[dict]) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(c['experiment'])}</td><td>{html.escape(c['claim'])}</td>"
        f"<td>{html.escape(c['measured'])}</td>"
        f"<td class='{'yes' if c['held'] else 'no'}'>{'held' if c['held'] else 'did not hold'}</td></tr>"
        for c in claims
    )
    head = "<tr><th>experiment</th><th>claim</th><th>measured in this run</th><th></th></tr>"
    return f"<table>{head}{rows}</table>"


def write_report(
    out_dir: str | Path, title: str, sections: list[dict], *, elapsed_s: float | None = None
) -> Path:
    """Write ``results.json`` and ``index.html`` into ``out_dir``; return the HTML's path.

    Each section: ``name``, ``title``, ``description`` (plain words), ``pngs`` (paths),
    ``claims`` (rows of :func:`batchnorm.lab.experiments._common.claim`), ``results`` (the dict
    the experiment returned, configuration included).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    claims = [c for s in sections for c in s["claims"]]
    meta = {
        "created": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "elapsed_s": elapsed_s,
    }
    document = {
        "title": title,
        "meta": meta,
        "claims": claims,
        "experiments": {s["name"]: s["results"] for s in sections},
    }
    (out / "results.json").write_text(json.dumps(jsonable(document), indent=1, allow_nan=False))
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='meta'>{html.escape(' - '.join(f'{k}: {v}' for k, v in meta.items() if v))}</p>",
        "<h2>Summary</h2>",
        _claims_html(claims),
    ]
    for s in sections:
        parts.append(f"<section><h2>{html.escape(s['title'])}</h2><p>{html.escape(s['description'])}</p>")
        parts.append(_claims_html(s["claims"]))
        for png in s["pngs"]:
            data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
            parts.append(f"<img alt='{html.escape(Path(png).name)}' src='data:image/png;base64,{data}'>")
        config = json.dumps(jsonable(s["results"].get("config", {})), indent=1)
        parts.append(
            f"<details><summary>configuration</summary><pre>{html.escape(config)}</pre></details></section>"
        )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"
