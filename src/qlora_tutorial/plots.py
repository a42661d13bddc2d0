"""Plots the notebooks show, one function per figure; each returns its matplotlib ``Figure``.

Every function names the notebook that uses it. They only draw what they are
given: the numbers come from the other modules.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import confusion_matrix


def plot_dequantization_error(original: np.ndarray, restored: np.ndarray, title: str) -> Figure:
    """Notebook 02: a 4-bit layer's dequantized weights against the originals, and the error histogram."""
    original, restored = np.ravel(original), np.ravel(restored)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sample = np.random.default_rng(0).choice(original.size, size=min(original.size, 5_000), replace=False)
    left.scatter(original[sample], restored[sample], s=2, alpha=0.4, label="5,000 sampled weights")
    low, high = float(original.min()), float(original.max())
    left.plot([low, high], [low, high], color="black", linewidth=0.8, label="no error (y = x)")
    left.set(
        xlabel="original weight (fp32)",
        ylabel="dequantized weight (fp32)",
        title="Dequantized against original weights",
    )
    left.legend(loc="upper left")
    right.hist(restored - original, bins=100, color="tab:orange")
    right.set(xlabel="dequantized - original", ylabel="number of weights", title="Quantization error")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_weight_memory(rows: Sequence[Mapping[str, float]]) -> Figure:
    """Notebook 02: stacked weight memory (MiB) by precision, with ``get_memory_footprint()`` marked.

    Each row holds ``precision``, ``unquantized_mib``, ``quantized_mib``, ``state_mib`` and ``footprint_mib``.
    """
    names = [str(row["precision"]) for row in rows]
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    bottom = np.zeros(len(rows))
    for key, label in (
        ("unquantized_mib", "unquantized (embeddings, LayerNorm, biases, head)"),
        ("quantized_mib", "quantized weights (packed)"),
        ("state_mib", "quantization state (absmax, code books)"),
    ):
        values = np.array([float(row[key]) for row in rows])
        ax.bar(x, values, bottom=bottom, label=label)
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
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def percent_lines_over_powers_of_two(
    x: Sequence[int], series: Mapping[str, Sequence[float]], xlabel: str, ylabel: str, title: str
) -> Figure:
    """One line per series of fractions, drawn in percent over an x axis of powers of two (ranks, block sizes)."""
    figure, axis = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        axis.plot(x, [100 * value for value in values], marker="o", label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks(list(x), [str(value) for value in x])
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def plot_trainable_share(ranks: Sequence[int], shares: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Notebook 03: trainable share of parameters (%) against the LoRA rank, one line per target set."""
    return percent_lines_over_powers_of_two(ranks, shares, "LoRA rank r", "trainable parameters (% of all)", title)


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
    """Notebook 04: training loss per logging step and validation accuracy per evaluation, from ``log_history``."""
    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    accuracies = [(entry["step"], entry["eval_accuracy"]) for entry in log_history if "eval_accuracy" in entry]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(*zip(*losses, strict=True), marker=".", label="training loss")
    left.set_xlabel("optimizer step")
    left.set_ylabel("cross-entropy loss (nats)")
    left.set_title(f"{title}: training loss")
    left.legend()
    if accuracies:
        right.plot(*zip(*accuracies, strict=True), marker="o", color="tab:orange", label="validation accuracy")
        right.legend()
    right.set_xlabel("optimizer step")
    right.set_ylabel("accuracy")
    right.set_title(f"{title}: validation accuracy")
    figure.tight_layout()
    return figure


def plot_learning_rate_curves(histories: dict[str, list[dict[str, float]]], accuracies: dict[str, float]) -> Figure:
    """Notebook 04: training loss per step for each learning rate, and each rate's validation accuracy after."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5), gridspec_kw={"width_ratios": [2, 1]})
    for name, history in histories.items():
        steps, losses = zip(*[(entry["step"], entry["loss"]) for entry in history if "loss" in entry], strict=True)
        left.plot(steps, losses, marker=".", label=f"lr {name}")
    left.set_xlabel("optimizer step")
    left.set_ylabel("training loss (nats)")
    left.set_title("Training loss by learning rate")
    left.legend()
    bars = right.bar([f"lr {name}" for name in accuracies], list(accuracies.values()), color="tab:orange")
    right.bar_label(bars, fmt="%.2f")
    right.set_ylim(0, 1)
    right.set_ylabel("validation accuracy")
    right.set_title("After the same steps")
    figure.tight_layout()
    return figure


def plot_confusion_matrix(labels: np.ndarray, predictions: np.ndarray, names: tuple[str, ...]) -> Figure:
    """Notebook 05: the confusion matrix as counts, true topics in rows, predicted topics in columns."""
    matrix = confusion_matrix(labels, predictions, labels=list(range(len(names))))
    figure, axis = plt.subplots(figsize=(5, 4.5))
    image = axis.imshow(matrix, cmap="Blues")
    for row in range(len(names)):
        for column in range(len(names)):
            color = "white" if matrix[row, column] > matrix.max() / 2 else "black"
            axis.text(column, row, str(matrix[row, column]), ha="center", va="center", color=color)
    axis.set_xticks(range(len(names)), names)
    axis.set_yticks(range(len(names)), names)
    axis.set_xlabel("predicted topic")
    axis.set_ylabel("true topic")
    axis.set_title("Confusion matrix (test texts)")
    figure.colorbar(image, ax=axis, label="texts")
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
    """Notebook 01: reconstruction error (%) against the block size, one line per data type."""
    ylabel = "relative error ||W - Ŵ|| / ||W|| (%)"
    return percent_lines_over_powers_of_two(block_sizes, errors, "block size (values per absmax)", ylabel, title)


def plot_method_comparison(rows: Sequence[Mapping[str, object]], title: str) -> Figure:
    """Notebook 06: weight and peak training memory (MiB) beside validation and test accuracy, one bar per method.

    Each row holds ``method``, ``weight_mib``, ``peak_mib``, ``validation_accuracy`` and ``test_accuracy``
    (``comparison.comparison_row``); rows without them (inference-only) are left out.
    """
    rows = [row for row in rows if row.get("peak_mib") is not None]
    names = [str(row["method"]).replace(" (", "\n(") for row in rows]
    x = np.arange(len(rows))
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5))
    for axis, keys, ylabel, subtitle in (
        (left, (("weight_mib", "weights"), ("peak_mib", "peak training memory")), "memory (MiB)", "Memory"),
        (right, (("validation_accuracy", "validation"), ("test_accuracy", "test")), "accuracy", "Accuracy"),
    ):
        for offset, (key, label) in zip((-0.2, 0.2), keys, strict=True):
            values = [float(row[key]) for row in rows]
            bars = axis.bar(x + offset, values, width=0.4, label=label)
            axis.bar_label(bars, fmt="%.0f" if key.endswith("mib") else "%.2f", fontsize=8)
        axis.set_xticks(x, names, fontsize=8)
        axis.set(xlabel="method", ylabel=ylabel, title=subtitle)
        axis.margins(y=0.15)
        axis.legend(loc="lower right" if axis is right else "upper right")
    right.set_ylim(0, 1.05)
    figure.suptitle(title)
    figure.tight_layout()
    return figure


def plot_memory_projection(
    sizes: Sequence[str], gigabytes: Mapping[str, Sequence[float]], gpus: Mapping[str, float], title: str
) -> Figure:
    """Notebook 06: projected training memory (GB, log scale) by model size, one line per method, GPUs as lines."""
    figure, axis = plt.subplots(figsize=(9, 5))
    for method, values in gigabytes.items():
        axis.plot(sizes, values, marker="o", label=method)
    seen: dict[float, list[str]] = {}
    for gpu, memory in gpus.items():
        seen.setdefault(memory, []).append(gpu)
    for memory, names in seen.items():
        axis.axhline(memory, color="gray", linestyle="--", linewidth=0.8)
        axis.text(len(sizes) - 1, memory, f" {' / '.join(names)} ({memory:g} GB)", va="bottom", ha="right", fontsize=8)
    axis.set_yscale("log")
    axis.set(xlabel="model size (LLaMA shapes)", ylabel="training memory without activations (GB, log scale)")
    axis.set_title(title)
    axis.grid(alpha=0.3, which="both", axis="y")
    axis.legend(loc="upper left")
    figure.tight_layout()
    return figure
