"""Classification metrics from scikit-learn (taught in notebooks 04 and 05).

Accuracy and macro-F1 (the mean of the four per-class F1 scores, so a model
that ignores one topic cannot hide it). No metric is fetched from the Hub.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, f1_score
from transformers import EvalPrediction


def classification_metrics(labels: np.ndarray, predictions: np.ndarray) -> dict[str, float]:
    """Accuracy and macro-F1 of predicted class ids against true ones."""
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
    }


def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
    """The ``Trainer``'s ``compute_metrics`` hook: logits in, accuracy and macro-F1 out."""
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return classification_metrics(np.asarray(prediction.label_ids), np.argmax(logits, axis=-1))
