"""Every plot draws from small inputs, labels its axes and returns its figure; the axes do not mislead."""

import math
from itertools import combinations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from qlora_tutorial import plots
from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.projection import LLAMA_SHAPES, PAPER_65B_GPU, usable_gib
from qlora_tutorial.uncertainty import Interval

HISTORY = [
    {"loss": 1.3, "step": 5, "epoch": 0.5},
    {"eval_accuracy": 0.6, "eval_loss": 1.0, "step": 10, "epoch": 1.0},
    {"loss": 0.9, "step": 15, "epoch": 1.5},
    {"eval_accuracy": 0.8, "eval_loss": 0.7, "step": 20, "epoch": 2.0},
]
SWEEP = [{"loss": 1.386 - 0.001 * step, "step": step} for step in range(1, 11)]
METHOD_ROW = {
    "method": "QLoRA (nf4-dq)",
    "weight_mib": 50.9,
    "baseline_mib": 551.0,
    "peak_mib": 1700.0,
    "peak_kind": "process peak RSS",
    "validation_accuracy": 0.7,
    "test_accuracy": Interval(0.71, 0.69, 0.73),
}
MEMORY_ROW = {
    "precision": "nf4",
    "unquantized_mib": 45.0,
    "quantized_mib": 5.0,
    "state_mib": 0.6,
    "footprint_mib": 50.0,
}
FULL_PRECISION_ROW = {
    **MEMORY_ROW,
    "precision": "fp32",
    "unquantized_mib": 86.6,
    "quantized_mib": 0.0,
    "state_mib": 0.0,
}
SIZES = ["1.3B", "7B", "65B"]


def nf4_like_layer() -> tuple[np.ndarray, np.ndarray]:
    """A 16 x 64 weight and its blockwise (64) 16-level round trip, as a 4-bit layer dequantizes it."""
    original = np.random.default_rng(0).normal(scale=0.1, size=(16, 64))
    levels = np.linspace(-1, 1, 16)
    blocks = original.reshape(-1, 64)
    absmax = np.abs(blocks).max(axis=1, keepdims=True)
    nearest = np.abs(blocks[..., None] / absmax[..., None] - levels).argmin(axis=-1)
    return original, (levels[nearest] * absmax).reshape(original.shape)


FIGURES = {
    "pipeline": lambda: plots.plot_qlora_pipeline(),
    "levels": lambda: plots.plot_weights_with_levels(
        np.random.default_rng(0).normal(size=500), np.linspace(-1, 1, 16), "t"
    ),
    "data type": lambda: plots.plot_error_by_data_type({"nf4": 0.09, "fp4": 0.12}, "t"),
    "block size": lambda: plots.plot_error_by_block_size([32, 64, 4096], {"nf4": [0.08, 0.09, 0.14]}, "t"),
    "dequantization": lambda: plots.plot_dequantization_error(*nf4_like_layer(), "t"),
    "weight memory": lambda: plots.plot_weight_memory([FULL_PRECISION_ROW, MEMORY_ROW]),
    "trainable share": lambda: plots.plot_trainable_share([4, 8, 64], {"query+value": [0.002, 0.004, 0.03]}, "t"),
    "padding": lambda: plots.plot_padding_comparison({"dynamic": 1500, "max": 2048}, {"dynamic": 7.0, "max": 10.0}),
    "training": lambda: plots.plot_training_curves(HISTORY),
    "learning rates": lambda: plots.plot_learning_rate_curves({"1e-3": SWEEP}, {"1e-3": 0.3}),
    "confusion": lambda: plots.plot_confusion_matrix(
        np.array([0, 0, 0, 0, 1, 2, 3, 3]), np.array([0, 0, 0, 1, 1, 2, 3, 2]), LABEL_NAMES
    ),
    "methods": lambda: plots.plot_method_comparison(
        [
            METHOD_ROW,
            {**METHOD_ROW, "peak_mib": None},
            {**METHOD_ROW, "baseline_mib": 1733.0, "peak_mib": 2317.0},  # a run in a notebook's kernel
            {"method": "merged", "latency_ms": None},
        ],
        "t",
        validation_rows=800,
    ),
    "projection": lambda: plots.plot_memory_projection(
        SIZES, {"QLoRA": [1.8, 6.4, 47.3], "full": [21.5, 107.8, 1044.6]}, ["T4", "A100 40GB"], "t"
    ),
}


@pytest.fixture
def figure(request: pytest.FixtureRequest):
    """The named figure, drawn (so text positions are final), closed after the test."""
    drawn = FIGURES[request.param]()
    drawn.canvas.draw()
    yield drawn
    plt.close(drawn)


def horizontal_lines(axis: matplotlib.axes.Axes) -> list[float]:
    """The y of every line drawn flat across the axis (axhline)."""
    return [line.get_ydata()[0] for line in axis.get_lines() if len(set(line.get_ydata())) == 1]


def overlaps(a: matplotlib.transforms.Bbox, b: matplotlib.transforms.Bbox) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


@pytest.mark.parametrize("figure", list(FIGURES), indirect=True)
def test_plot_returns_a_labelled_figure(figure, request):
    name = request.node.callspec.params["figure"]
    axes = [axis for axis in figure.axes if axis.has_data()]
    assert axes, f"{name} drew nothing"
    if name != "pipeline":
        assert all(axis.get_xlabel() or axis.get_ylabel() for axis in axes), f"{name} has an unlabelled axis"


@pytest.mark.parametrize("figure", ["trainable share"], indirect=True)
def test_trainable_share_is_drawn_on_linear_axes_from_zero(figure):
    axis = figure.axes[0]
    assert axis.get_xscale() == "linear" and axis.get_yscale() == "linear"
    assert axis.get_ylim()[0] == 0 and axis.get_xlim()[0] == 0


@pytest.mark.parametrize("figure", ["block size"], indirect=True)
def test_block_size_plot_gives_bits_per_parameter_on_a_second_axis(figure):
    axis = figure.axes[0]
    assert axis.get_xscale() == "log" and axis.get_ylim()[0] == 0
    (bits,) = axis.child_axes
    assert [label.get_text() for label in bits.get_xticklabels()] == ["5.000", "4.500", "4.008"]
    assert "bits per parameter" in bits.get_xlabel()


@pytest.mark.parametrize("figure", ["dequantization"], indirect=True)
def test_dequantization_shows_one_block_on_its_levels(figure):
    left = figure.axes[0]
    (points,) = left.collections
    block = points.get_offsets()
    assert len(block) == 64 and len(np.unique(block[:, 1])) <= 16
    assert set(np.unique(block[:, 1])) <= set(horizontal_lines(left)), "every level the block uses is drawn"
    diagonal = next(line for line in left.get_lines() if line.get_label().startswith("no error"))
    assert min(diagonal.get_xdata()) >= block[:, 0].min() and max(diagonal.get_xdata()) <= block[:, 0].max()


@pytest.mark.parametrize("figure", ["weight memory"], indirect=True)
def test_unquantized_models_are_not_labelled_as_leftovers(figure):
    axis = figure.axes[0]
    by_label = {container.get_label(): container for container in axis.containers}
    whole = by_label["every parameter, none quantized"]
    leftover = next(container for label, container in by_label.items() if label.startswith("left unquantized"))
    assert [bar.get_x() + bar.get_width() / 2 for bar in whole] == [0]
    assert [bar.get_x() + bar.get_width() / 2 for bar in leftover] == [1]


@pytest.mark.parametrize("figure", ["training"], indirect=True)
def test_training_curves_show_validation_loss_on_honest_axes(figure):
    loss, accuracy = figure.axes
    labels = [line.get_label() for line in loss.get_lines()]
    assert "validation loss" in labels and any(label.startswith("training loss") for label in labels)
    assert math.log(4) in horizontal_lines(loss)
    assert loss.get_ylim()[0] == 0 and loss.get_ylim()[1] > math.log(4)
    assert accuracy.get_ylim() == (0, 1) and 0.25 in horizontal_lines(accuracy)


@pytest.mark.parametrize("figure", ["learning rates"], indirect=True)
def test_learning_rate_losses_start_at_zero_with_the_chance_line(figure):
    loss, accuracy = figure.axes
    assert loss.get_ylim()[0] == 0 and loss.get_ylim()[1] > math.log(4)
    assert math.log(4) in horizontal_lines(loss)
    assert accuracy.get_ylim() == (0, 1)


@pytest.mark.parametrize("figure", ["confusion"], indirect=True)
def test_confusion_matrix_rows_are_normalized(figure):
    axis = figure.axes[0]
    shares = np.asarray(axis.get_images()[0].get_array())
    assert np.allclose(shares.sum(axis=1), 1)
    assert shares[0, 1] == pytest.approx(0.25)
    texts = [text.get_text() for text in axis.texts]
    assert "75.0%\n(3)" in texts and "25.0%\n(1)" in texts


@pytest.mark.parametrize("figure", ["methods"], indirect=True)
def test_method_comparison_gives_each_measure_its_own_axis_and_a_legend_off_the_bars(figure):
    weights, peak, accuracy = figure.axes[:3]
    assert [bar.get_height() for bar in weights.patches] == [50.9, 50.9, 50.9]
    heights = [bar.get_height() for bar in peak.patches]
    assert heights == [1700.0, 0.0, 0.0], "only a peak that compares gets a bar"
    assert [text.get_text() for text in peak.texts] == ["1700", "not its own", "not comparable\n(other baseline)"]
    legend = accuracy.get_legend().get_window_extent()
    assert legend.y1 <= accuracy.get_window_extent().y0, "the legend sits below the plot, not over the points"


@pytest.mark.parametrize("figure", ["methods"], indirect=True)
def test_method_comparison_zooms_the_accuracy_axis_to_the_intervals(figure):
    """A point of accuracy must be visible: the axis spans the intervals (validation's of 800 rows included)."""
    accuracy = figure.axes[2]
    low, high = accuracy.get_ylim()
    validation_low = 0.7 - 0.04  # Wilson's 95% interval of 70% on 800 rows reaches about 3 points below it
    assert 0.6 < low < validation_low and 0.73 < high < 0.8
    assert "zoomed" in accuracy.get_ylabel()
    assert {"70.0%", "71.0%"} <= {text.get_text() for text in accuracy.texts}


@pytest.mark.parametrize("figure", ["projection"], indirect=True)
def test_projection_places_models_at_their_parameter_counts_with_a_48_gb_line(figure):
    axis = figure.axes[0]
    assert axis.get_xscale() == "log" and axis.get_yscale() == "log"
    qlora = next(line for line in axis.get_lines() if line.get_label() == "QLoRA")
    assert list(qlora.get_xdata()) == [LLAMA_SHAPES[size].parameters for size in SIZES]
    assert usable_gib(PAPER_65B_GPU) in horizontal_lines(axis), "the paper's 48 GB GPU, at its usable memory"
    assert usable_gib("T4") in horizontal_lines(axis) and 16.0 not in horizontal_lines(axis)
    low, high = axis.get_ylim()
    shown = [label.get_text() for label in axis.get_yticklabels() if low <= label.get_position()[1] <= high]
    assert shown == ["2", "5", "10", "20", "50", "100", "200", "500", "1000"], "1, 2, 5 per power of ten, plain"
    labels = [text.get_window_extent() for text in axis.texts]
    assert len(labels) == 3 and not any(overlaps(a, b) for a, b in combinations(labels, 2))
    ticks = [label.get_window_extent() for label in axis.get_xticklabels() if label.get_text()]
    assert len(ticks) == len(SIZES) and not any(overlaps(a, b) for a, b in combinations(ticks, 2))
