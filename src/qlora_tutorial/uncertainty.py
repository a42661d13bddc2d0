"""Intervals, paired tests and the verdict rule behind every comparison the series states.

Taught in notebook 06. One run on a shared machine is noisy, and 7,600 test
texts still leave an accuracy uncertain by about a point, so no comparison is
stated from two bare numbers. Accuracies get a 95% Wilson interval, macro-F1 a
bootstrap one, two models on the same test rows McNemar's exact test, and
timings their median and interquartile range. Two timings paired one to one
(the same batch in each run, the same text in the same interleaved round) get
Wilcoxon's signed-rank test. A verdict follows one rule: a difference counts
only when the intervals (or the test) say it is not noise; otherwise it is
"not settled".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import binomtest, norm, rankdata, wilcoxon

CONFIDENCE = 0.95
SIGNIFICANCE = 0.05
NOT_SETTLED = "not settled"


@dataclass(frozen=True)
class Interval:
    """An estimate with the bounds of its confidence interval."""

    estimate: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.estimate:.2%} [{self.low:.2%}, {self.high:.2%}]"


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements and their interquartile range."""

    median: float
    q1: float
    q3: float
    count: int

    def format(self, unit: str, digits: int = 3) -> str:
        """``0.812 s (IQR 0.790-0.840, n=180)``."""
        return f"{self.median:.{digits}f} {unit} (IQR {self.q1:.{digits}f}-{self.q3:.{digits}f}, n={self.count})"


@dataclass(frozen=True)
class PairedTest:
    """McNemar's exact test on two models' correctness over the same rows."""

    only_first_right: int
    only_second_right: int
    p_value: float

    @property
    def significant(self) -> bool:
        """True when the two error rates differ at the 5% level."""
        return self.p_value < SIGNIFICANCE


@dataclass(frozen=True)
class PairedTimes:
    """Wilcoxon's signed-rank test on two timings measured in pairs (first minus second, pair by pair)."""

    median_difference: float
    pairs: int
    p_value: float
    first_slower: bool  # the direction the signed ranks lean: positive differences outrank negative ones

    @property
    def significant(self) -> bool:
        """True when the paired differences are not centred on zero at the 5% level."""
        return self.p_value < SIGNIFICANCE

    def format(self, unit: str, digits: int = 3) -> str:
        """``median paired difference +0.021 s, Wilcoxon p = 0.003 (n=395 pairs)``."""
        return (
            f"median paired difference {self.median_difference:+.{digits}f} {unit}, "
            f"Wilcoxon p = {self.p_value:.2g} (n={self.pairs} pairs)"
        )


def accuracy_interval(correct: Sequence[bool] | np.ndarray, confidence: float = CONFIDENCE) -> Interval:
    """Accuracy with its Wilson score interval (well-behaved near 0 and 1, unlike the normal approximation)."""
    hits = np.asarray(correct, dtype=bool)
    if hits.size == 0:
        raise ValueError("No predictions to score: pass one correctness flag per test row.")
    return proportion_interval(float(hits.mean()), hits.size, confidence)


def proportion_interval(proportion: float, count: int, confidence: float = CONFIDENCE) -> Interval:
    """A share of ``count`` rows (an accuracy) with its Wilson score interval, from the share and the count alone.

    For an accuracy kept only as a number, such as the validation accuracy the
    ``Trainer`` logs: notebook 06 gives its validation accuracies their intervals this way.
    """
    if count < 1 or not 0 <= proportion <= 1:
        raise ValueError(f"Need a share from 0 to 1 of at least one row, got {proportion} of {count}.")
    n, p = count, proportion
    z = float(norm.ppf(0.5 + confidence / 2))
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return Interval(p, max(0.0, centre - half), min(1.0, centre + half))


def macro_f1_from_confusion(confusion: np.ndarray) -> np.ndarray:
    """Macro-F1 of one or many confusion matrices (``[..., true, predicted]``); a class never seen scores 0."""
    hits = np.diagonal(confusion, axis1=-2, axis2=-1)
    actual, predicted = confusion.sum(axis=-1), confusion.sum(axis=-2)
    with np.errstate(divide="ignore", invalid="ignore"):
        f1 = np.where(actual + predicted > 0, 2 * hits / (actual + predicted), 0.0)
    return f1.mean(axis=-1)


def macro_f1_interval(
    labels: Sequence[int] | np.ndarray,
    predictions: Sequence[int] | np.ndarray,
    *,
    resamples: int = 1000,
    seed: int = 0,
    confidence: float = CONFIDENCE,
) -> Interval:
    """Macro-F1 with a percentile bootstrap interval over the test rows (seeded, so it reproduces).

    Each resample draws the rows again with replacement; its confusion matrix is
    the rows' (true, predicted) cells weighted by how often each row was drawn.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape or labels.size == 0:
        raise ValueError(f"Need one prediction per label, got {labels.size} labels and {predictions.size} predictions.")
    classes = int(max(labels.max(), predictions.max())) + 1
    cells = np.eye(classes * classes)[labels * classes + predictions]  # one-hot (true, predicted) per row
    draws = np.random.default_rng(seed).multinomial(labels.size, np.full(labels.size, 1 / labels.size), resamples)
    scores = macro_f1_from_confusion((draws @ cells).reshape(resamples, classes, classes))
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(scores, [tail, 100 - tail])
    estimate = macro_f1_from_confusion(cells.sum(axis=0).reshape(classes, classes))
    return Interval(float(estimate), float(low), float(high))


def mcnemar(first_correct: Sequence[bool] | np.ndarray, second_correct: Sequence[bool] | np.ndarray) -> PairedTest:
    """McNemar's exact test: whether two models, scored on the same rows, make errors at different rates.

    Only the rows where exactly one model is right carry information; under
    "no difference" each of them is a fair coin, hence a two-sided binomial test.
    """
    first, second = np.asarray(first_correct, dtype=bool), np.asarray(second_correct, dtype=bool)
    if first.shape != second.shape:
        raise ValueError(f"McNemar needs the same rows for both models, got {first.size} and {second.size}.")
    only_first, only_second = int((first & ~second).sum()), int((~first & second).sum())
    discordant = only_first + only_second
    p_value = 1.0 if discordant == 0 else float(binomtest(only_first, discordant, 0.5).pvalue)
    return PairedTest(only_first, only_second, p_value)


def spread(values: Sequence[float] | np.ndarray) -> Spread:
    """Median and interquartile range of repeated measurements."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("No measurements: time at least one step or one text.")
    q1, median, q3 = np.percentile(array, [25, 50, 75])
    return Spread(float(median), float(q1), float(q3), int(array.size))


def paired_times(first: Sequence[float] | np.ndarray, second: Sequence[float] | np.ndarray) -> PairedTimes:
    """Wilcoxon's signed-rank test (two-sided) on timings taken in pairs: element ``i`` of each under one condition.

    Pairing removes what the two share (the batch's length, the text, the
    machine's load in that round), so only the method's own difference is
    left. Pairs with no difference carry no sign and are dropped, as Wilcoxon
    did; with none left the p-value is 1.
    """
    a, b = np.asarray(first, dtype=float), np.asarray(second, dtype=float)
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"A paired test needs the same number of timings for both, got {a.size} and {b.size}.")
    differences = (a - b)[a != b]
    if differences.size == 0:
        return PairedTimes(0.0, int(a.size), 1.0, first_slower=False)
    ranks = rankdata(np.abs(differences))
    leaning = float(ranks[differences > 0].sum() - ranks[differences < 0].sum())
    p_value = float(wilcoxon(differences).pvalue)
    return PairedTimes(float(np.median(a - b)), int(a.size), p_value, first_slower=leaning > 0)


def faster_paired(test: PairedTimes, first_name: str, second_name: str) -> str:
    """The verdict on two paired timings: the faster one only when Wilcoxon's test gives p < 0.05.

    The one timing rule of the series: notebook 05 applies it to its four ways of using an adapter, notebook 06
    to the methods' steps and latencies.
    """
    if not test.significant:
        return NOT_SETTLED
    return f"{second_name} faster" if test.first_slower else f"{first_name} faster"


def smaller(first: float, second: float, first_name: str, second_name: str, tolerance: float) -> str:
    """The verdict on two sizes: the smaller one only when they differ by more than ``tolerance`` (same unit)."""
    if abs(first - second) <= tolerance:
        return NOT_SETTLED
    return f"{first_name} smaller" if first < second else f"{second_name} smaller"


def more_accurate(test: PairedTest, first_name: str, second_name: str) -> str:
    """The verdict on two models' accuracy on the same rows: a winner only when McNemar's test is significant."""
    if not test.significant:
        return NOT_SETTLED
    return (
        f"{first_name} more accurate"
        if test.only_first_right > test.only_second_right
        else f"{second_name} more accurate"
    )
