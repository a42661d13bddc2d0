import numpy as np
import pytest

from qlora_tutorial.uncertainty import (
    NOT_SETTLED,
    Spread,
    accuracy_interval,
    faster_paired,
    macro_f1_interval,
    mcnemar,
    more_accurate,
    paired_times,
    proportion_interval,
    smaller,
    spread,
)


def test_wilson_interval_matches_the_textbook_value():
    interval = accuracy_interval([True] * 50 + [False] * 50)
    assert interval.estimate == 0.5
    assert interval.low == pytest.approx(0.4038, abs=1e-4) and interval.high == pytest.approx(0.5962, abs=1e-4)


def test_wilson_interval_stays_inside_zero_and_one_and_narrows_with_more_rows():
    perfect = accuracy_interval([True] * 20)
    assert perfect.high == 1.0 and 0.8 < perfect.low < 1.0
    small, large = accuracy_interval([True, False] * 50), accuracy_interval([True, False] * 3800)
    assert large.high - large.low < (small.high - small.low) / 5


def test_accuracy_interval_refuses_no_rows():
    with pytest.raises(ValueError, match="one correctness flag per test row"):
        accuracy_interval([])


def test_a_share_and_its_row_count_give_the_same_interval_as_the_rows():
    """The validation accuracy is kept as a number: its count of rows is all the interval needs."""
    assert proportion_interval(0.7, 800) == accuracy_interval([True] * 560 + [False] * 240)
    with pytest.raises(ValueError, match="at least one row"):
        proportion_interval(0.5, 0)


def test_macro_f1_interval_brackets_the_estimate_and_reproduces():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 4, 400)
    predictions = np.where(rng.random(400) < 0.8, labels, rng.integers(0, 4, 400))
    first = macro_f1_interval(labels, predictions, resamples=200)
    assert first.low < first.estimate < first.high
    assert first == macro_f1_interval(labels, predictions, resamples=200)


def test_macro_f1_interval_refuses_mismatched_rows():
    with pytest.raises(ValueError, match="one prediction per label"):
        macro_f1_interval([0, 1, 2], [0, 1])


def test_mcnemar_counts_only_the_rows_where_the_models_disagree():
    first = np.array([True] * 10 + [False] * 2 + [True] * 50 + [False] * 38)
    second = np.array([False] * 10 + [True] * 2 + [True] * 50 + [False] * 38)
    test = mcnemar(first, second)
    assert (test.only_first_right, test.only_second_right) == (10, 2)
    assert test.p_value == pytest.approx(0.03857, abs=1e-4)
    assert test.significant and more_accurate(test, "A", "B") == "A more accurate"


def test_mcnemar_on_identical_models_is_not_significant():
    same = np.array([True, False, True])
    test = mcnemar(same, same)
    assert test.p_value == 1.0 and more_accurate(test, "A", "B") == NOT_SETTLED


def test_mcnemar_needs_the_same_rows():
    with pytest.raises(ValueError, match="same rows"):
        mcnemar([True], [True, False])


def test_spread_is_median_and_quartiles():
    assert spread([1, 2, 3, 4, 100]) == Spread(median=3.0, q1=2.0, q3=4.0, count=5)
    with pytest.raises(ValueError, match="No measurements"):
        spread([])


def test_a_paired_test_finds_a_small_steady_difference_that_overlapping_ranges_hide():
    """Each pair shares its batch: the spread between batches is large, the difference within each pair small."""
    batches = np.random.default_rng(0).uniform(0.4, 0.8, 60)
    slower = batches + 0.01
    assert spread(slower).q1 < spread(batches).q3, "the interquartile ranges overlap"
    test = paired_times(slower, batches)
    assert test.significant and test.first_slower and test.median_difference == pytest.approx(0.01)
    assert faster_paired(test, "A", "B") == "B faster"
    assert faster_paired(paired_times(batches, slower), "A", "B") == "A faster"


def test_paired_noise_without_a_direction_is_not_settled():
    base = np.linspace(1.0, 2.0, 40)
    noisy = base + np.where(np.arange(40) % 2 == 0, 0.05, -0.05)
    assert faster_paired(paired_times(noisy, base), "A", "B") == NOT_SETTLED
    same = paired_times(base, base)
    assert (same.p_value, same.pairs, same.median_difference) == (1.0, 40, 0.0)
    assert faster_paired(same, "A", "B") == NOT_SETTLED
    assert "Wilcoxon p = 1 (n=40 pairs)" in same.format("s")


def test_a_paired_test_needs_one_timing_per_pair():
    with pytest.raises(ValueError, match="same number of timings"):
        paired_times([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="same number of timings"):
        paired_times([], [])


def test_smaller_ignores_differences_within_the_tolerance():
    assert smaller(50.9, 86.6, "QLoRA", "LoRA", tolerance=1) == "QLoRA smaller"
    assert smaller(1_710, 1_690, "QLoRA", "LoRA", tolerance=50) == NOT_SETTLED


def test_macro_f1_estimate_equals_scikit_learns():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 4, 300)
    predictions = np.where(rng.random(300) < 0.7, labels, rng.integers(0, 4, 300))
    interval = macro_f1_interval(labels, predictions, resamples=50)
    assert interval.estimate == pytest.approx(f1_score(labels, predictions, average="macro"))
