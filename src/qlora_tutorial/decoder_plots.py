"""Notebook 08's two figures: the decoder's training loss, and its answers per topic before and after training.

As in ``plots``, each function draws only what it is given and returns its
``Figure``; the axes start at zero. The decoder's loss is the cross-entropy
of the answer tokens over the whole 49,152-token vocabulary, so it starts far
above the ln 4 of a four-way classifier, and no chance line is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from qlora_tutorial.data import LABEL_NAMES


def plot_decoder_loss(log_history: Sequence[Mapping[str, float]], title: str = "QLoRA on the decoder") -> Figure:
    """The training loss at each logging step (the ``Trainer``'s ``log_history``), on an axis from zero."""
    losses = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry]
    if not losses:
        raise ValueError("The log history holds no training loss: train at least logging_steps steps.")
    steps, values = zip(*losses, strict=True)
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot(steps, values, marker=".", label="training loss (mean since the last logging step)")
    axis.set_ylim(0, 1.1 * max(values))
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("cross-entropy of the answer tokens (nats)")
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_answers_per_topic(
    answers: Mapping[str, Sequence[int] | np.ndarray],
    labels: Sequence[int] | np.ndarray,
    title: str = "Answers per topic",
) -> Figure:
    """How often each reading answered each topic (grouped bars), beside how many test rows each topic has.

    ``answers`` maps a reading's name (``"zero-shot"``, ``"after QLoRA"``) to
    its answer, a label index, for every test row. A model that leans towards
    some topics shows bars far from the marks of the true counts.
    """
    if not answers:
        raise ValueError("No answers to draw: pass at least one reading's answers.")
    topics = np.arange(len(LABEL_NAMES))
    width = 0.8 / len(answers)
    figure, axis = plt.subplots(figsize=(7, 3.8))
    for index, (name, answered) in enumerate(answers.items()):
        counts = np.bincount(np.asarray(answered), minlength=len(LABEL_NAMES))
        bars = axis.bar(topics - 0.4 + width * (index + 0.5), counts, width, label=name)
        axis.bar_label(bars, fontsize=8)
    truth = np.bincount(np.asarray(labels), minlength=len(LABEL_NAMES))
    axis.scatter(topics, truth, marker="_", s=900, color="black", zorder=3, label="test rows of the topic")
    axis.set_xticks(topics, LABEL_NAMES)
    axis.set_ylabel("answers")
    axis.set_ylim(0, 1.15 * axis.get_ylim()[1])
    axis.set_title(title)
    axis.legend(fontsize=8)
    figure.tight_layout()
    return figure
