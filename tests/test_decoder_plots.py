"""Notebook 08's figures draw what they are given, from zero, and refuse nothing to draw."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest

from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.decoder_plots import plot_answers_per_topic, plot_decoder_loss

HISTORY = [{"loss": 5.5, "step": 6}, {"loss": 0.8, "step": 12}, {"train_runtime": 60.0, "step": 12}]


def test_the_loss_curve_draws_each_logged_loss_on_an_axis_from_zero():
    figure = plot_decoder_loss(HISTORY, "t")
    (axis,) = figure.axes
    (line,) = axis.get_lines()
    assert list(line.get_xdata()) == [6, 12] and list(line.get_ydata()) == [5.5, 0.8]
    assert axis.get_ylim()[0] == 0 and axis.get_ylim()[1] >= 5.5
    assert axis.get_xlabel() and axis.get_ylabel() and axis.get_title() == "t"
    plt.close(figure)


def test_a_history_without_a_loss_is_refused():
    with pytest.raises(ValueError, match="no training loss"):
        plot_decoder_loss([{"train_runtime": 1.0, "step": 1}])


def test_answers_per_topic_count_each_readings_answers_beside_the_true_counts():
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    answers = {"zero-shot": np.zeros(8, dtype=int), "tuned": labels}
    figure = plot_answers_per_topic(answers, labels)
    (axis,) = figure.axes
    heights = [[bar.get_height() for bar in container] for container in axis.containers]
    assert heights == [[8, 0, 0, 0], [2, 2, 2, 2]], "one group of bars per reading, one bar per topic"
    (marks,) = axis.collections
    assert list(marks.get_offsets()[:, 1]) == [2, 2, 2, 2], "the test rows of each topic"
    assert [label.get_text() for label in axis.get_xticklabels()] == list(LABEL_NAMES)
    assert axis.get_ylim()[0] == 0 and axis.get_ylabel()
    plt.close(figure)


def test_no_answers_are_refused():
    with pytest.raises(ValueError, match="No answers to draw"):
        plot_answers_per_topic({}, [0, 1])
