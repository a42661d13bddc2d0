"""Plots the notebooks show, one function per figure; each returns its matplotlib ``Figure``.

Every function names the notebook that uses it. They only draw what they are
given: the numbers come from the other modules. The axes are chosen so that a
figure cannot overstate a result: bars and losses start at zero (or the chance
level is drawn); accuracies that differ by a point are drawn as points with
their 95% intervals on an axis zoomed to them, said in the axis label, so that
the eye compares intervals, not bar heights; a scale is linear unless the data
span powers of ten, and a log scale is said in the axis label.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator, PercentFormatter
from sklearn.metrics import confusion_matrix

from qlora_tutorial.comparison import comparable_peak_rows
from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.projection import PAPER_65B_GPU, get_shape, usable_gib
from qlora_tutorial.quantization import bits_per_parameter
from qlora_tutorial.uncertainty import Interval, proportion_interval

# Cross-entropy of a uniform guess over the topics (ln 4 = 1.386 nats): a loss at this line has learned nothing.
CHANCE_LOSS = math.log(len(LABEL_NAMES))
CHANCE_ACCURACY = 1 / len(LABEL_NAMES)
# Two reference lines closer than this factor would print their labels over each other (log-scale memory axis).
_CLOSE_LINES = 1.35
# A zoomed accuracy axis leaves this share of the intervals' span free above and below them.
_ZOOM_MARGIN = 0.15


def _chance_line(axis: Axes, level: float, text: str) -> None:
    """A dotted horizontal line at the chance level, in the legend as ``text``."""
    axis.axhline(level, color="gray", linestyle=":", linewidth=1.2, label=text)


def _loss_axis(axis: Axes, highest: float) -> None:
    """A loss axis from zero, high enough for the chance line and the highest loss drawn."""
    _chance_line(axis, CHANCE_LOSS, f"chance: ln {len(LABEL_NAMES)} = {CHANCE_LOSS:.3f}")
    axis.set_ylim(0, 1.1 * max(highest, CHANCE_LOSS))


def plot_dequantization_error(original: np.ndarray, restored: np.ndarray, title: str, block_size: int = 64) -> Figure:
    """Notebook 02: one block's 4-bit staircase, and the error histogram of the whole layer.

    Left: the first block of ``block_size`` weights (the tensor flattened, as
    bitsandbytes cuts it), dequantized against original. Every weight of a
    block snaps to one of the 16 levels of the code book times the block's
    absmax, so the points form a staircase around the no-error line; the
    levels the block uses are drawn. Right: the error of every weight.
    """
    original, restored = np.ravel(original), np.ravel(restored)
    block_original, block_restored = original[:block_size], restored[:block_size]
    levels = np.unique(block_restored)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for index, level in enumerate(levels):
        label = f"the {len(levels)} levels this block uses (of 16)" if index == 0 else None
        left.axhline(level, color="tab:gray", linewidth=0.6, alpha=0.6, label=label)
    low, high = float(block_original.min()), float(block_original.max())
    left.plot([low, high], [low, high], color="black", linestyle="--", linewidth=0.8, label="no error (y = x)")
    left.scatter(block_original, block_restored, s=14, color="tab:blue", zorder=3, label=f"the {block_size} weights")
    left.set(
        xlabel="original weight (fp32)",
        ylabel="dequantized weight (fp32)",
        title=f"One block of {block_size} weights: each snaps to a level",
    )
    left.legend(loc="upper left", fontsize=8)
    right.hist(restored - original, bins=100, color="tab:orange")
    right.set(
        xlabel="dequantized - original",
        ylabel="number of weights",
        title=f"Quantization error, all {original.size:,} weights",
    )
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_weight_memory(rows: Sequence[Mapping[str, float]]) -> Figure:
    """Notebook 02: stacked weight memory (MiB) by precision, with ``get_memory_footprint()`` marked.

    Each row holds ``precision``, ``unquantized_mib``, ``quantized_mib``, ``state_mib`` and ``footprint_mib``.
    A precision with no quantized weights (fp32, bf16, fp16) is one bar of every parameter; in a quantized
    model the unquantized part is only what bitsandbytes leaves alone, so the two get their own colours.
    """
    names = [str(row["precision"]) for row in rows]
    x = np.arange(len(rows))
    quantized = np.array([float(row["quantized_mib"]) > 0 for row in rows])
    unquantized = np.array([float(row["unquantized_mib"]) for row in rows])
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar(x[~quantized], unquantized[~quantized], color="tab:gray", label="every parameter, none quantized")
    ax.bar(
        x[quantized],
        unquantized[quantized],
        color="tab:blue",
        label="left unquantized (embeddings, LayerNorm, biases, head)",
    )
    bottom = unquantized.copy()
    for key, label, color in (
        ("quantized_mib", "quantized linear weights", "tab:orange"),
        ("state_mib", "quantization state (absmax, code books)", "tab:green"),
    ):
        values = np.array([float(row[key]) for row in rows])
        ax.bar(x[quantized], values[quantized], bottom=bottom[quantized], color=color, label=label)
        bottom += values
    footprint = [float(row["footprint_mib"]) for row in rows]
    ax.scatter(x, footprint, marker="_", s=900, color="black", zorder=3, label="get_memory_footprint()")
    for position, total in zip(x, bottom, strict=True):
        ax.annotate(
            f"{total:.1f}",
            (position, total),
            ha="center",
            va="bottom",
            fontsize=9,
            xytext=(0, 3),
            textcoords="offset points",
        )
    ax.set_xticks(x, names)
    ax.set(xlabel="precision", ylabel="weight memory (MiB)", title="Weight memory by precision")
    ax.set_ylim(0, 1.3 * float(bottom.max()))
    ax.legend(loc="upper right", fontsize=8, markerscale=0.4)
    fig.tight_layout()
    return fig


def _percent_lines(axis: Axes, x: Sequence[int], series: Mapping[str, Sequence[float]]) -> None:
    """One line per series of fractions, drawn in percent, with a tick at every x."""
    for label, values in series.items():
        axis.plot(x, [100 * value for value in values], marker="o", label=label)
    axis.set_xticks(list(x), [str(value) for value in x])
    axis.set_ylim(bottom=0)
    axis.grid(alpha=0.3)
    axis.legend()


def plot_trainable_share(ranks: Sequence[int], shares: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Notebook 03: trainable share of parameters (%) against the LoRA rank, one line per target set.

    Both axes are linear, so the adapters' growth, linear in r, shows as a straight line.
    """
    figure, axis = plt.subplots(figsize=(7, 4))
    _percent_lines(axis, ranks, shares)
    axis.set_xlim(0, 1.05 * max(ranks))
    axis.set(xlabel="LoRA rank r", ylabel="trainable parameters (% of all)", title=title)
    figure.tight_layout()
    return figure


def plot_padding_comparison(tokens_per_batch: dict[str, float], ms_per_step: dict[str, float]) -> Figure:
    """Notebook 04: padded tokens per batch and training step time, dynamic padding vs padding to max length."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    colors = ["tab:green", "tab:red"]
    for axis, values, label, title in (
        (left, tokens_per_batch, "tokens per batch (padding included)", "Tokens the model processes"),
        (right, ms_per_step, "forward + backward per batch (ms)", "Training step time"),
    ):
        bars = axis.bar(list(values), list(values.values()), color=colors[: len(values)])
        axis.bar_label(bars, fmt="%.0f")
        axis.set_ylabel(label)
        axis.set_title(title)
        axis.margins(y=0.15)
    figure.tight_layout()
    return figure


def plot_training_curves(log_history: list[dict[str, float]], title: str = "QLoRA training") -> Figure:
    """Notebook 04: training and validation loss, and validation accuracy, from the ``Trainer``'s ``log_history``.

    Both panels start at zero and mark chance (ln 4 for the loss, 25% for the
    accuracy), so a fall in loss is seen against where it started and where it
    could go, not magnified by a tight axis.
    """
    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    evaluations = [entry for entry in log_history if "eval_loss" in entry]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(*zip(*losses, strict=True), marker=".", label="training loss (each logging step)")
    if evaluations:
        steps = [entry["step"] for entry in evaluations]
        left.plot(steps, [entry["eval_loss"] for entry in evaluations], marker="o", label="validation loss")
    _loss_axis(left, max(value for _, value in losses))
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy loss (nats)")
    left.set_title(f"{title}: loss")
    left.legend(fontsize=8)
    accuracies = [(entry["step"], entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]
    if accuracies:
        steps, values = zip(*accuracies, strict=True)
        right.plot(steps, values, marker="o", color="tab:orange", label="validation accuracy")
        for step, value in accuracies:
            right.annotate(f"{value:.1%}", (step, value), xytext=(0, -14), textcoords="offset points", ha="center")
    _chance_line(right, CHANCE_ACCURACY, f"chance: {CHANCE_ACCURACY:.0%}")
    right.set_ylim(0, 1)
    right.yaxis.set_major_formatter(PercentFormatter(1))
    right.set_xlabel("optimizer step")
    right.set_ylabel("validation accuracy")
    right.set_title(f"{title}: accuracy")
    right.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    return figure


def plot_learning_rate_curves(histories: dict[str, list[dict[str, float]]], accuracies: dict[str, float]) -> Figure:
    """Notebook 04: training loss per step for each learning rate, and each rate's validation accuracy after.

    The loss axis starts at zero with the chance line (ln 4): in a short sweep
    the losses move by hundredths, and a tight axis would make that noise look
    like learning.
    """
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    highest = 0.0
    for name, history in histories.items():
        steps, losses = zip(*[(entry["step"], entry["loss"]) for entry in history if "loss" in entry], strict=True)
        left.plot(steps, losses, marker=".", label=f"lr {name}")
        highest = max(highest, *losses)
    _loss_axis(left, highest)
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (nats)")
    left.set_title("Training loss by learning rate")
    left.legend(loc="lower left", fontsize=8)
    bars = right.bar(list(accuracies), list(accuracies.values()), color="tab:orange")
    right.bar_label(bars, labels=[f"{value:.0%}" for value in accuracies.values()], fontsize=8)
    _chance_line(right, CHANCE_ACCURACY, f"chance: {CHANCE_ACCURACY:.0%}")
    right.set_ylim(0, 1)
    right.yaxis.set_major_formatter(PercentFormatter(1))
    right.tick_params(axis="x", labelrotation=45, labelsize=8)
    right.set_xlabel("learning rate")
    right.set_ylabel("validation accuracy")
    right.set_title("After the same steps")
    right.legend(loc="upper left", fontsize=8)
    figure.tight_layout()
    return figure


def plot_confusion_matrix(labels: np.ndarray, predictions: np.ndarray, names: tuple[str, ...]) -> Figure:
    """Notebook 05: the confusion matrix with each row normalized to 100%, true topics in rows.

    A cell shows the share of the true topic's texts predicted as the column's
    topic, and their count. The colour scale is a square root, so that errors
    of a few percent are visibly coloured next to a diagonal of 80% to 98%;
    the colour bar shows the scale.
    """
    counts = confusion_matrix(labels, predictions, labels=list(range(len(names))))
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    figure, axis = plt.subplots(figsize=(5.5, 4.8))
    image = axis.imshow(shares, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1))
    for row in range(len(names)):
        for column in range(len(names)):
            color = "white" if shares[row, column] > 0.4 else "black"
            text = f"{shares[row, column]:.1%}\n({counts[row, column]:,})"
            axis.text(column, row, text, ha="center", va="center", color=color, fontsize=9)
    axis.set_xticks(range(len(names)), names)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted topic")
    axis.set_ylabel("true topic")
    axis.set_title("Confusion matrix, each row = 100%\n(test texts; counts in brackets)")
    colorbar = figure.colorbar(image, ax=axis, label="share of the true topic's texts (square-root scale)")
    colorbar.set_ticks([0, 0.02, 0.1, 0.25, 0.5, 0.75, 1])
    colorbar.ax.yaxis.set_major_formatter(PercentFormatter(1, decimals=0))
    figure.tight_layout()
    return figure


def plot_qlora_pipeline() -> Figure:
    """Notebook 00: the four steps of QLoRA as boxes and arrows, from a full-precision model to a trained adapter."""
    steps = (
        ("pretrained BERT\nfull-precision weights", "tab:gray"),
        ("1. quantize the base\nto 4-bit NF4 (frozen)", "tab:blue"),
        ("2. add low-rank\nadapters (LoRA) to\nquery and value", "tab:orange"),
        ("3. train only the\nadapters; the 4-bit base\nis dequantized on the fly", "tab:green"),
        ("4. keep the adapter\nseparate (a small file)\nor merge it into the base", "tab:purple"),
    )
    figure, axis = plt.subplots(figsize=(13, 2.6))
    width, gap = 2.2, 0.45
    for index, (text, color) in enumerate(steps):
        left = index * (width + gap)
        axis.add_patch(plt.Rectangle((left, 0), width, 1, facecolor=color, alpha=0.18, edgecolor=color, linewidth=1.5))
        axis.text(left + width / 2, 0.5, text, ha="center", va="center", fontsize=10)
        if index:
            axis.annotate("", xy=(left, 0.5), xytext=(left - gap, 0.5), arrowprops={"arrowstyle": "->", "lw": 1.5})
    axis.set_xlim(-0.1, len(steps) * (width + gap) - gap + 0.1)
    axis.set_ylim(-0.1, 1.1)
    axis.axis("off")
    axis.set_title("QLoRA: quantize the base, add adapters, train only the adapters, then keep or merge them")
    figure.tight_layout()
    return figure


def plot_weights_with_levels(scaled_weights: np.ndarray, levels: np.ndarray, title: str) -> Figure:
    """Notebook 01: histogram of weights divided by their block's absmax, with the 4-bit levels drawn over it."""
    figure, axis = plt.subplots(figsize=(10, 4))
    axis.hist(np.ravel(scaled_weights), bins=200, range=(-1, 1), color="tab:blue", alpha=0.7, label="weights / absmax")
    for index, level in enumerate(np.ravel(levels)):
        axis.axvline(level, color="tab:red", linewidth=1, alpha=0.8, label="NF4 levels" if index == 0 else None)
    axis.set(xlabel="weight divided by its block's absmax (unitless)", ylabel="number of weights", title=title)
    axis.legend(loc="upper right")
    figure.tight_layout()
    return figure


def plot_error_by_data_type(errors: Mapping[str, float], title: str) -> Figure:
    """Notebook 01: reconstruction error (% of the weights' norm) for each data type, as labelled bars."""
    figure, axis = plt.subplots(figsize=(7, 4))
    bars = axis.bar(list(errors), [100 * value for value in errors.values()], color="tab:blue")
    axis.bar_label(bars, fmt="%.2f%%")
    axis.set(xlabel="data type (block size 64)", ylabel="relative error ||W - Ŵ|| / ||W|| (%)", title=title)
    axis.margins(y=0.15)
    figure.tight_layout()
    return figure


def plot_error_by_block_size(block_sizes: Sequence[int], errors: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Notebook 01: reconstruction error (%) against the block size, one line per data type, and what it costs.

    The block sizes double, so the bottom axis is log 2; the top axis gives the
    bits per parameter each block size costs (4-bit codes plus one fp32 absmax
    per block, ``quantization.bits_per_parameter``): error against bits.
    """
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    axis.set_xscale("log", base=2)
    axis.xaxis.set_minor_locator(NullLocator())
    _percent_lines(axis, block_sizes, errors)
    axis.set(xlabel="block size (values per absmax, log scale)", ylabel="relative error ||W - Ŵ|| / ||W|| (%)")
    bits = axis.secondary_xaxis("top")
    bits.set_xticks(list(block_sizes), [f"{bits_per_parameter(size):.3f}" for size in block_sizes])
    bits.xaxis.set_minor_locator(NullLocator())
    bits.set_xlabel("bits per parameter (4-bit code + fp32 absmax per block, no double quantization)")
    axis.set_title(title)
    figure.tight_layout()
    return figure


def plot_method_comparison(rows: Sequence[Mapping[str, object]], title: str, validation_rows: int) -> Figure:
    """Notebook 06: weight memory, peak training memory and accuracy, each on its own axis, one group per method.

    Each row holds ``method``, ``weight_mib``, ``peak_mib``, ``peak_kind``, ``validation_accuracy`` (a share of
    ``validation_rows`` rows) and ``test_accuracy``, an ``uncertainty.Interval`` (``comparison.comparison_row``);
    rows without a test accuracy (inference-only) are left out. Only peaks that compare get a bar
    (``comparison.comparable_peak_rows``): a peak that is not the run's own (``memory.peak_is_own``), or one
    from a run that started from another baseline than a fresh process's, gets only a note saying so.
    Weights and peak memory get separate panels: on one axis the tens of MiB of weights would vanish next to a
    peak of over a GiB. The accuracies differ by a point or two, which a 0-1 axis hides: they are points with
    their 95% Wilson intervals, on an axis zoomed to the intervals (``_accuracy_points``).
    """
    rows = comparable_peak_rows([row for row in rows if row.get("test_accuracy") is not None])
    names = [str(row["method"]).replace(" (", "\n(") for row in rows]
    kinds = " / ".join(sorted({str(row["peak_kind"]) for row in rows}))
    x = np.arange(len(rows))
    figure, (weights, peak, accuracy) = plt.subplots(1, 3, figsize=(15, 4.8), layout="constrained")
    for axis, key, ylabel, subtitle, color in (
        (weights, "weight_mib", "weight memory (MiB)", "Weights (quantization state included)", "tab:blue"),
        (peak, "peak_mib", f"peak memory, {kinds} (MiB)", "Peak memory while training", "tab:red"),
    ):
        values = [row[key] for row in rows]
        labels = [
            str(row.get("peak_note")) if value is None else f"{float(value):.0f}"
            for row, value in zip(rows, values, strict=True)
        ]
        bars = axis.bar(x, [0.0 if value is None else float(value) for value in values], color=color)
        axis.bar_label(bars, labels=labels, fontsize=8)
        axis.set(ylabel=ylabel, title=subtitle)
        axis.margins(y=0.12)
    validation = [proportion_interval(float(row["validation_accuracy"]), validation_rows) for row in rows]
    _accuracy_points(accuracy, x - 0.15, validation, f"validation ({validation_rows:,} rows)")
    tests = [row["test_accuracy"] for row in rows]
    _accuracy_points(accuracy, x + 0.15, tests, "test")
    bounds = [bound for interval in (*validation, *tests) for bound in (interval.low, interval.high)]
    margin = _ZOOM_MARGIN * (max(bounds) - min(bounds))
    accuracy.set_ylim(max(0.0, min(bounds) - margin), min(1.0, max(bounds) + margin))
    accuracy.yaxis.set_major_formatter(PercentFormatter(1.0, decimals=1))
    accuracy.set(ylabel="accuracy, 95% interval (axis zoomed to the intervals)", title="Accuracy")
    accuracy.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    for axis in (weights, peak, accuracy):
        axis.set_xticks(x, names, fontsize=8)
    figure.suptitle(title)
    return figure


def _accuracy_points(axis: Axes, x: np.ndarray, intervals: Sequence[Interval], label: str) -> None:
    """Accuracies as points with their 95% intervals as error bars, each point's value printed beside it."""
    estimates = [interval.estimate for interval in intervals]
    below = [interval.estimate - interval.low for interval in intervals]
    above = [interval.high - interval.estimate for interval in intervals]
    axis.errorbar(x, estimates, yerr=[below, above], fmt="o", capsize=3, label=label)
    for position, estimate in zip(x, estimates, strict=True):
        axis.annotate(f"{estimate:.1%}", (position, estimate), xytext=(4, 0), textcoords="offset points", fontsize=7)


def _memory_line(axis: Axes, memory: float, text: str, above: bool, **style: object) -> None:
    """A horizontal memory line across the plot, its label in the right margin above or below it."""
    axis.axhline(memory, linewidth=0.9, **style)
    axis.annotate(
        f" {text}",
        (1, memory),
        xycoords=("axes fraction", "data"),
        va="bottom" if above else "top",
        ha="left",
        fontsize=8,
        annotation_clip=False,
    )


def plot_memory_projection(
    sizes: Sequence[str], gigabytes: Mapping[str, Sequence[float]], gpus: Sequence[str], title: str
) -> Figure:
    """Notebook 06: projected training memory (GiB) against parameter count, one line per method, GPUs as lines.

    ``sizes`` are names from ``projection.LLAMA_SHAPES``; each is placed at its
    real parameter count, so both axes are numeric and log scale, and a method
    whose memory is proportional to the parameters is a straight line of slope
    one. Each GPU (a name in ``estimator.GPUS``) is a line at the memory a
    program can allocate on it (``projection.usable_gib``), not the size it is
    sold as; GPUs with the same memory share a line. The QLoRA paper's 48 GB
    GPU (65B on one GPU; ``projection.PAPER_65B_GPU``) is drawn too, in red.
    Labels sit in the right margin, below their line when the next line up is
    too close. The memory axis is labelled at 1, 2 and 5 times each power of
    ten, so a reader can read a need off it.
    """
    parameters = [get_shape(size).parameters for size in sizes]
    figure, axis = plt.subplots(figsize=(10, 5.5), layout="constrained")
    for method, values in gigabytes.items():
        axis.plot(parameters, values, marker="o", label=method)
    names_by_memory: dict[float, list[str]] = {}
    for gpu in dict.fromkeys([*gpus, PAPER_65B_GPU]):
        names_by_memory.setdefault(usable_gib(gpu), []).append(gpu)
    lines = {memory: f"{' / '.join(names)} ({memory:g} GiB usable)" for memory, names in names_by_memory.items()}
    paper = usable_gib(PAPER_65B_GPU)
    lines[paper] += "; the QLoRA paper's 48 GB GPU for 65B"
    heights = sorted(lines)
    for index, memory in enumerate(heights):
        above = index + 1 == len(heights) or heights[index + 1] > _CLOSE_LINES * memory
        style = {"color": "tab:red", "linestyle": "-."} if memory == paper else {"color": "gray", "linestyle": "--"}
        _memory_line(axis, memory, lines[memory], above, **style)
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.xaxis.set_minor_locator(NullLocator())
    axis.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 5)))
    axis.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.yaxis.set_minor_locator(NullLocator())
    axis.set_xticks(
        parameters, [f"{size}\n({count / 1e9:.2f}B)" for size, count in zip(sizes, parameters, strict=True)]
    )
    axis.set(
        xlabel="parameters (log scale; LLaMA shapes, named size and exact count)",
        ylabel="training memory without activations (GiB, log scale)",
    )
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both", axis="y")
    axis.legend(loc="upper left")
    return figure
