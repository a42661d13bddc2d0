"""Notebook 09's headline figure: peak memory and seconds per step against model size, one line per method.

Kept apart from ``plots`` (the figures of notebooks 01 to 06) because it draws
the ladder of ``scale_runs``: measured runs as filled markers, runs the
estimator kept from starting as hollow ones at their predicted peak, and the
memory of this machine and of GPUs as horizontal lines, so the learner sees
where each method stops fitting.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from qlora_tutorial.plots import _CLOSE_LINES, _memory_line

GIB = 2**30
METHOD_STYLES: dict[str, dict[str, str]] = {
    "full fine-tuning": {"color": "tab:gray", "marker": "s"},
    "LoRA on an fp32 base": {"color": "tab:blue", "marker": "o"},
    "LoRA on a bf16 base": {"color": "tab:purple", "marker": "D"},
    "QLoRA": {"color": "tab:green", "marker": "^"},
}


def _memory_lines(axis: Axes, lines: Mapping[str, float]) -> None:
    """Dashed horizontal lines for memories (bytes), labelled in the right margin, the lower of a close pair below."""
    heights = sorted((value / GIB, name) for name, value in lines.items())
    for index, (height, name) in enumerate(heights):
        above = index + 1 == len(heights) or heights[index + 1][0] > _CLOSE_LINES * height
        color = "tab:red" if "this machine" in name else "gray"
        _memory_line(axis, height, f"{name} ({height:.1f} GiB)", above, color=color, linestyle="--")


def _size_axis(axis: Axes, sizes: Mapping[str, int]) -> None:
    """A log-scale parameter axis with one labelled tick per shape: its name and its count in billions."""
    axis.set_xscale("log")
    axis.xaxis.set_minor_locator(NullLocator())
    axis.set_xticks(list(sizes.values()), [f"{name}\n{count / 1e9:.2f}B" for name, count in sizes.items()])
    axis.set_xlabel("parameters (log scale)")
    axis.grid(alpha=0.3, which="both")


def plot_memory_ladder(rows: Sequence[Mapping[str, Any]], memory_lines: Mapping[str, float], title: str) -> Figure:
    """Peak memory (left) and seconds per step (right) against parameters, one line per method.

    Each row has ``shape``, ``parameters``, ``method`` (a name of
    ``METHOD_STYLES``), ``predicted_bytes``, and ``measured_bytes`` and
    ``step_seconds`` for a run that ran (None for one predicted only).
    ``memory_lines`` maps a label (``"this machine, available"``, ``"T4,
    usable"``) to bytes. Measured points are filled, predicted-only ones
    hollow at their predicted peak; the memory axis is log scale.
    """
    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(13, 5.2), layout="constrained")
    sizes = {row["shape"]: row["parameters"] for row in sorted(rows, key=lambda row: row["parameters"])}
    for method, style in METHOD_STYLES.items():
        points = sorted((row for row in rows if row["method"] == method), key=lambda row: row["parameters"])
        if not points:
            continue
        peaks = [(row["measured_bytes"] or row["predicted_bytes"]) / GIB for row in points]
        memory_axis.plot([row["parameters"] for row in points], peaks, color=style["color"], linewidth=1, label=method)
        for row, peak in zip(points, peaks, strict=True):
            filled = row["measured_bytes"] is not None
            memory_axis.plot(
                row["parameters"],
                peak,
                marker=style["marker"],
                color=style["color"],
                markerfacecolor=style["color"] if filled else "white",
                markersize=7,
            )
        timed = [row for row in points if row.get("step_seconds")]
        if timed:
            time_axis.plot(
                [row["parameters"] for row in timed],
                [row["step_seconds"] for row in timed],
                marker=style["marker"],
                color=style["color"],
                label=method,
            )
    _memory_lines(memory_axis, memory_lines)
    memory_axis.set_yscale("log")
    memory_axis.set_ylabel("peak memory (GiB, log scale)")
    memory_axis.set_title("Peak memory: filled measured, hollow predicted only")
    memory_axis.legend(loc="upper left", fontsize=8)
    time_axis.set_yscale("log")
    time_axis.set_ylabel("seconds per training step (log scale)")
    time_axis.set_title("Time per step (measured runs)")
    time_axis.legend(loc="upper left", fontsize=8)
    for axis in (memory_axis, time_axis):
        _size_axis(axis, sizes)
    figure.suptitle(title)
    return figure
