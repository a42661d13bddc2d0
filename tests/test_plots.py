"""Every plot draws from small inputs, labels its axes and returns its figure."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from qlora_tutorial import plots
from qlora_tutorial.data import LABEL_NAMES

HISTORY = [
    {"loss": 1.3, "step": 5, "epoch": 0.5},
    {"eval_accuracy": 0.6, "eval_loss": 1.0, "step": 10, "epoch": 1.0},
    {"loss": 0.9, "step": 15, "epoch": 1.5},
    {"eval_accuracy": 0.8, "eval_loss": 0.7, "step": 20, "epoch": 2.0},
]
METHOD_ROW = {"method": "QLoRA (nf4-dq)", "weight_mib": 50.9, "peak_mib": 1700.0, "validation_accuracy": 0.7}
MEMORY_ROW = {
    "precision": "nf4",
    "unquantized_mib": 45.0,
    "quantized_mib": 5.0,
    "state_mib": 0.6,
    "footprint_mib": 50.0,
}

FIGURES = {
    "pipeline": lambda: plots.plot_qlora_pipeline(),
    "levels": lambda: plots.plot_weights_with_levels(
        np.random.default_rng(0).normal(size=500), np.linspace(-1, 1, 16), "t"
    ),
    "data type": lambda: plots.plot_error_by_data_type({"nf4": 0.09, "fp4": 0.12}, "t"),
    "block size": lambda: plots.plot_error_by_block_size([32, 64], {"nf4": [0.08, 0.09]}, "t"),
    "dequantization": lambda: plots.plot_dequantization_error(
        np.arange(6.0), np.arange(6.0) + np.linspace(-0.1, 0.1, 6), "t"
    ),
    "weight memory": lambda: plots.plot_weight_memory([MEMORY_ROW, {**MEMORY_ROW, "precision": "fp32"}]),
    "trainable share": lambda: plots.plot_trainable_share([4, 8], {"query+value": [0.002, 0.004]}, "t"),
    "padding": lambda: plots.plot_padding_comparison({"dynamic": 1500, "max": 2048}, {"dynamic": 7.0, "max": 10.0}),
    "training": lambda: plots.plot_training_curves(HISTORY),
    "learning rates": lambda: plots.plot_learning_rate_curves({"1e-3": HISTORY}, {"1e-3": 0.8}),
    "confusion": lambda: plots.plot_confusion_matrix(np.array([0, 1, 2, 3, 3]), np.array([0, 1, 2, 3, 2]), LABEL_NAMES),
    "methods": lambda: plots.plot_method_comparison([{**METHOD_ROW, "test_accuracy": 0.71}], "t"),
    "projection": lambda: plots.plot_memory_projection(["7B", "65B"], {"QLoRA": [6.4, 47.3]}, {"T4": 16.0}, "t"),
}


@pytest.mark.parametrize("name", list(FIGURES))
def test_plot_returns_a_labelled_figure(name):
    figure = FIGURES[name]()
    try:
        axes = [axis for axis in figure.axes if axis.has_data()]
        assert axes, f"{name} drew nothing"
        if name != "pipeline":
            assert all(axis.get_xlabel() or axis.get_ylabel() for axis in axes), f"{name} has an unlabelled axis"
    finally:
        plt.close(figure)
