"""Evaluation reports: JSON, Markdown tables and PNG bar charts (matplotlib, headless Agg)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from afmkit.eval.jsonl import write_json_atomic, write_text_atomic


def write_json_report(path: str | os.PathLike, obj: Any) -> Path:
    write_json_atomic(path, obj)
    return Path(path)


def write_markdown(path: str | os.PathLike, text: str) -> Path:
    write_text_atomic(path, text)
    return Path(path)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(
    path: str | os.PathLike,
    *,
    labels: Sequence[str],
    series: dict[str, Sequence[float]],
    title: str,
    ylabel: str,
    errors: dict[str, Sequence[tuple[float, float]]] | None = None,
    ylim: tuple[float, float] = (0, 100),
) -> Path:
    """Grouped bars, one group per label and one bar per series; written atomically as PNG.

    ``errors`` optionally gives (low, high) interval bounds per bar, drawn as error bars.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(labels) * max(1, len(series)) + 2), 5))
    for i, (name, values) in enumerate(series.items()):
        offsets = x + (i - (len(series) - 1) / 2) * width
        yerr = None
        if errors and name in errors:
            lows, highs = zip(*errors[name])
            yerr = [np.subtract(values, lows), np.subtract(highs, values)]
        ax.bar(offsets, values, width, label=name, yerr=yerr, capsize=3 if yerr is not None else 0)
    ax.set_xticks(x, labels, rotation=60 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center")
    ax.set_ylabel(ylabel)
    ax.set_ylim(*ylim)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
