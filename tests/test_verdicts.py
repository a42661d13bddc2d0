"""Notebook 06's comparison rows, their verdicts and their tables, on made-up results (no training)."""

from __future__ import annotations

import numpy as np
import pytest

from qlora_tutorial.comparison import FULL, LORA, MERGED, QLORA, QLORA_ALL_LINEAR, comparable_peak_rows, comparison_row
from qlora_tutorial.comparison_tables import markdown_table, verdict_table
from qlora_tutorial.uncertainty import spread
from qlora_tutorial.verdicts import verdicts

LABELS = np.array([0, 1, 2, 3] * 50)


def results(
    method: str,
    *,
    wrong: int,
    step: float,
    weight_mib: float,
    peak_mib: float,
    trainable: int = 75_268,
) -> dict:
    """A results.json as the pipeline writes it, with ``wrong`` mistakes on the 200 test rows (the first ones).

    ``peak_mib`` is the peak by the end of training; predicting the test rows afterwards raises the run's final
    peak by 150 MiB, which the comparison leaves out.
    """
    predictions = LABELS.copy()
    predictions[:wrong] = (predictions[:wrong] + 1) % 4
    return {
        "method": method,
        "weight_bytes": weight_mib * 2**20,
        "quant_state_bytes": 0,
        "memory_baseline_bytes": 600 * 2**20,
        "peak_at_start_bytes": 610 * 2**20,  # a fresh process: its peak is its own
        "peak_before_training_bytes": 900 * 2**20,
        "peak_after_training_bytes": peak_mib * 2**20,
        "peak_memory_bytes": (peak_mib + 150) * 2**20,
        "peak_memory_kind": "process peak RSS",
        "trainable_parameters": trainable,
        "total_parameters": 22_790_024,
        "optimizer_state_bytes": 602_144,
        "train_steps": 40,
        "step_seconds": [step * 3] * 5 + [step + 0.01 * (i % 3) for i in range(35)],
        "validation_accuracy": 0.9,
        "test_predictions": predictions.tolist(),
        "settings": {"profile": {"learning_rate": 1e-3}},
    }


def rows(qlora_wrong: int, lora_wrong: int, qlora_step: float = 0.8, qlora_peak: float = 1_700) -> list[dict]:
    return [
        comparison_row(
            results(LORA.label, wrong=lora_wrong, step=0.5, weight_mib=86.6, peak_mib=1_650), LABELS, [100] * 9
        ),
        comparison_row(
            results(QLORA.label, wrong=qlora_wrong, step=qlora_step, weight_mib=50.9, peak_mib=qlora_peak),
            LABELS,
            [200, 210, 190] * 3,
        ),
        {"method": MERGED, "latency_ms": spread([90] * 9), "latency_samples": [90] * 9},
    ]


def with_all_linear(found: list[dict], *, full_wrong: int, all_linear_wrong: int) -> list[dict]:
    """``found`` with full fine-tuning and all-linear QLoRA added (every run's mistakes are on the first rows)."""
    full = results(FULL.label, wrong=full_wrong, step=0.7, weight_mib=86.6, peak_mib=1_900, trainable=22_714_756)
    all_linear = results(
        QLORA_ALL_LINEAR.label, wrong=all_linear_wrong, step=0.9, weight_mib=50.9, peak_mib=1_720, trainable=339_460
    )
    return [comparison_row(full, LABELS, [120] * 9), *found, comparison_row(all_linear, LABELS, [230] * 9)]


def verdict(found: list[dict], start: str) -> str:
    return next(v["verdict"] for v in verdicts(found) if v["question"].startswith(start))


def test_row_scores_the_predictions_and_leaves_warmup_steps_out():
    row = rows(qlora_wrong=20, lora_wrong=20)[1]
    assert row["test_accuracy"].estimate == pytest.approx(0.9)
    assert row["test_accuracy"].low < 0.9 < row["test_accuracy"].high
    assert row["step_seconds"].median == pytest.approx(0.81) and row["step_seconds"].count == 35
    assert row["peak_mib"] == 1_700, "the peak by the end of training, not the run's final peak"
    assert row["training_increase_mib"] == pytest.approx(1_700 - 900)


def test_verdicts_follow_the_rules():
    close = rows(qlora_wrong=20, lora_wrong=22)
    assert verdict(close, "Does QLoRA train fewer") == "no: the same adapters"
    assert verdict(close, "Does QLoRA need less") == "weights: QLoRA smaller; training peak: not settled"
    assert verdict(close, "Does QLoRA train faster") == "LoRA faster"
    assert verdict(close, "Is QLoRA's inference") == "LoRA faster"
    assert verdict(close, "Does QLoRA keep") == "no difference found"
    assert verdict(rows(qlora_wrong=60, lora_wrong=20), "Does QLoRA keep") == "LoRA more accurate"
    assert verdict(rows(20, 20, qlora_step=0.5), "Does QLoRA train faster") == "not settled"
    assert verdict(rows(20, 20, qlora_peak=2_500), "Does QLoRA need less").endswith("training peak: LoRA smaller")


def test_speed_is_judged_by_a_paired_test_not_by_overlapping_ranges():
    """Every step of QLoRA 10 ms slower than the same batch's LoRA step: IQRs overlap, the paired test sees it."""
    found = rows(20, 20, qlora_step=0.505)
    qlora, lora = found[1]["step_seconds"], found[0]["step_seconds"]
    assert qlora.q1 <= lora.q3, "the interquartile ranges overlap"
    assert verdict(found, "Does QLoRA train faster") == "LoRA faster"
    measured = next(v["measured"] for v in verdicts(found) if v["question"].startswith("Does QLoRA train faster"))
    assert "median paired difference +0.0050 s, Wilcoxon p = " in measured and "(n=35 pairs)" in measured


def test_symmetric_noise_between_paired_timings_is_not_settled():
    found = rows(20, 20)
    found[1]["latency_samples"] = [90, 110] * 4 + [100]  # LoRA: 100 each time
    assert verdict(found, "Is QLoRA's inference") == "not settled"


def test_all_linear_qlora_the_test_cannot_tell_from_full_finetuning_is_no_difference_found_not_a_yes():
    found = with_all_linear(rows(qlora_wrong=40, lora_wrong=40), full_wrong=10, all_linear_wrong=10)
    assert verdict(found, "Does all-linear QLoRA still trail") == "no difference found (McNemar p = 1)"
    measured = next(v["measured"] for v in verdicts(found) if v["question"].startswith("Does all-linear"))
    assert "McNemar p = 1" in measured and "query/value QLoRA vs full fine-tuning: McNemar p = " in measured


def test_all_linear_qlora_still_behind_full_finetuning_still_trails():
    found = with_all_linear(rows(qlora_wrong=40, lora_wrong=40), full_wrong=0, all_linear_wrong=40)
    assert verdict(found, "Does all-linear QLoRA still trail").startswith(
        "yes: full fine-tuning more accurate (McNemar p = "
    )


def test_all_linear_qlora_ahead_of_full_finetuning_does_not_trail():
    found = with_all_linear(rows(qlora_wrong=40, lora_wrong=40), full_wrong=30, all_linear_wrong=0)
    assert verdict(found, "Does all-linear QLoRA still trail").startswith(
        "no: all-linear QLoRA more accurate (McNemar p = "
    )


def test_without_a_gap_by_the_test_there_is_none_to_test():
    found = with_all_linear(rows(qlora_wrong=12, lora_wrong=12), full_wrong=10, all_linear_wrong=10)
    assert verdict(found, "Does all-linear QLoRA still trail").startswith("no gap to test")


def test_the_cost_of_all_linear_adapters_names_which_qlora_each_verdict_favours():
    found = with_all_linear(rows(qlora_wrong=20, lora_wrong=20), full_wrong=10, all_linear_wrong=10)
    assert verdict(found, "What do adapters on all linear") == (
        "4.5x the trainable parameters; step: query/value QLoRA faster; training peak: not settled"
    )
    assert len(verdicts(found)) == len(verdicts(rows(20, 20))) + 2


def test_only_peaks_from_the_same_baseline_are_kept_for_the_plot():
    found = rows(20, 20)
    found[1]["baseline_mib"] = 1_733  # a run in notebook 04's kernel
    kept = comparable_peak_rows(found)
    assert kept[0]["peak_mib"] == 1_650 and kept[1]["peak_mib"] is None
    assert kept[1]["peak_note"].startswith("not comparable") and kept[2] == found[2]
    assert found[1]["peak_mib"] == 1_700, "the rows themselves are left as they are"


def test_a_peak_from_a_process_that_trained_before_is_not_compared():
    """Where the mark cannot be reset (macOS), notebook 04's run after the sweep reports the sweep's peak."""
    reused = results(QLORA.label, wrong=20, step=0.8, weight_mib=50.9, peak_mib=2_400)
    reused["peak_at_start_bytes"] = 2_300 * 2**20  # the kernel had been this large before the run began
    row = comparison_row(reused, LABELS, [200] * 9)
    assert row["peak_mib"] is None and row["training_increase_mib"] is None and row["baseline_mib"] == 600
    found = [rows(20, 20)[0], row]
    memory = next(v for v in verdicts(found) if v["question"].startswith("Does QLoRA need less"))
    assert memory["measured"].endswith("peak not its own vs 1,650 MiB")
    assert memory["verdict"].startswith("weights: QLoRA smaller; training peak: not measured on equal terms")
    assert "| - | - |" in markdown_table(found)


def test_runs_from_different_baselines_are_not_compared_on_peak_memory():
    """A run reused from notebook 04's kernel starts from the kernel's memory, not a fresh process's."""
    reused = results(QLORA.label, wrong=20, step=0.8, weight_mib=50.9, peak_mib=2_400)
    reused["memory_baseline_bytes"] = reused["peak_at_start_bytes"] = 1_850 * 2**20
    found = [rows(20, 20)[0], comparison_row(reused, LABELS, [200] * 9)]
    memory = next(v for v in verdicts(found) if v["question"].startswith("Does QLoRA need less"))
    assert memory["measured"].endswith("peak 2,400 vs 1,650 MiB (1,850 vs 600 MiB before loading)")
    assert memory["verdict"] == (
        "weights: QLoRA smaller; training peak: not measured on equal terms (the runs started from different baselines)"
    )


def test_tables_show_every_row_and_every_verdict():
    found = rows(qlora_wrong=20, lora_wrong=22)
    table = markdown_table(found).splitlines()
    assert len(table) == 2 + len(found)
    assert table[-1].startswith(f"| {MERGED} | - |") and "90 ms (IQR 90-90, n=9)" in table[-1]
    assert len(verdict_table(found).splitlines()) == 2 + len(verdicts(found))
