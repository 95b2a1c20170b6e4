"""Reports as people read them: a markdown table, a PNG of bar panels, and the same numbers as JSON (NaN written as
null). One home for the three, shared by the explanation comparison and the main job's summary."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = ["format_cell", "markdown_table", "jsonable", "write_json", "bar_panels"]


def format_cell(value: Any, fmt: str = "{:.3f}", missing: str = "–") -> str:
    """``value`` formatted with ``fmt``; ``missing`` for None and for non-finite floats."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return missing
    return fmt.format(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table; cells are written with ``str`` (``|`` inside a cell becomes ``/``)."""
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |")
    return "\n".join(lines)


def jsonable(value: Any) -> Any:
    """Plain JSON data: non-finite floats become None, mappings get string keys, tuples and tensors become lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist"):  # tensors and numpy values
        return jsonable(value.tolist())
    return value


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """Write ``jsonable(payload)`` to ``path`` (indented, UTF-8; the folder is created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=2), encoding="utf-8")
    return path


def bar_panels(
    panels: Sequence[tuple[str, Mapping[str, Sequence[float]]]],
    groups: Sequence[str],
    path: str | os.PathLike,
    *,
    baselines: Sequence[Mapping[str, float] | None] | None = None,
    baseline_name: str = "baseline",
    log_scale: Sequence[bool] | None = None,
    columns: int = 3,
    panel_size: tuple[float, float] = (6.0, 4.2),
) -> Path:
    """One panel per quantity, one group of bars per item (``groups`` on the x axis), one bar per series.

    Args:
        panels: ``(title, {series name: one value per group})`` per panel; NaN values draw no bar.
        groups: the x-axis labels (methods, models).
        path: the PNG to write (its folder is created).
        baselines: per panel, ``{series name: value}`` drawn as a dashed line in the series' colour (e.g. a
            random baseline), or None.
        baseline_name: how the baselines are named in the legend.
        log_scale: per panel, a logarithmic y axis.
        columns: panels per row.
        panel_size: inches per panel (width, height).

    Returns:
        The path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(panel_size[0] * columns, panel_size[1] * rows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, (ax, (title, series)) in enumerate(zip(axes.flat, panels, strict=False)):
        width = 0.8 / max(1, len(series))
        for k, (name, values) in enumerate(series.items()):
            color = colors[k % len(colors)]
            positions = [i + (k - (len(series) - 1) / 2) * width for i in range(len(groups))]
            ax.bar(
                positions, [math.nan if v is None else float(v) for v in values], width=width, label=name, color=color
            )
            baseline = (baselines[index] or {}).get(name) if baselines else None
            if baseline is not None and math.isfinite(baseline):
                ax.axhline(baseline, color=color, linestyle="--", linewidth=1, label=f"{name}: {baseline_name}")
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels(groups, rotation=45 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center",
                           fontsize=8)  # fmt: skip
        if log_scale and log_scale[index]:
            ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    if len(panels) and (len(panels[0][1]) > 1 or baselines):
        axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
