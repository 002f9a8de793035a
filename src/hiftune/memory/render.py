"""Writing results: Markdown tables, JSON files and PNG line plots."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Renders ``rows`` (dicts) as a GitHub Markdown table; floats get 2 decimals."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return "nan" if math.isnan(v) else f"{v:,.2f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_json(path: str | Path, obj: Any) -> Path:
    """Writes ``obj`` as indented JSON, creating parent directories."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    return path


def plot_lines(
    path: str | Path,
    series: Mapping[str, Sequence[float]],
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    x: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Plots one line per entry of ``series`` to a PNG file (matplotlib, no display needed).

    Args:
        path: Output ``.png`` path; parent directories are created.
        series: Label -> y values.
        title: Plot title.
        xlabel: X axis label.
        ylabel: Y axis label.
        x: Optional label -> x values (default: 0, 1, 2, ...).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, ys in series.items():
        xs = list(x[label]) if x and label in x else list(range(len(ys)))
        ax.plot(xs, list(ys), label=label, marker="." if len(ys) < 60 else None)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
