"""Verdicts on notebook 06's comparison rows, each question answered by a rule stated before the numbers are read.

Taught in notebook 06 (section 5); ``make benchmark`` writes the same verdicts
into the README's results. A typical LoRA-vs-QLoRA table states its claims by
eye; here each claim is a question with a rule: counts are compared exactly,
peak memories within ``comparison.PEAK_TOLERANCE`` of each other are not
settled (and runs from different baselines are not compared on peak at all),
timings taken in pairs (the same batch in each run, the same text in each
round) by Wilcoxon's signed-rank test, accuracies on the same test rows by
McNemar's test (``uncertainty``). A test that finds no difference says only
that, and the verdicts say so. Kept apart from ``comparison``, which trains
and measures, so that the rules read, and are tested, on rows made up by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from qlora_tutorial.comparison import FULL, LORA, PEAK_TOLERANCE, QLORA, QLORA_ALL_LINEAR, by_method, same_baseline
from qlora_tutorial.uncertainty import (
    NOT_SETTLED,
    PairedTest,
    faster_paired,
    mcnemar,
    more_accurate,
    paired_times,
    smaller,
)

QUERY_VALUE = "query/value QLoRA"  # QLoRA with the reference recipe's adapters, named apart from all-linear QLoRA
ALL_LINEAR = "all-linear QLoRA"


def peak_verdict(
    first: dict[str, Any], second: dict[str, Any], first_name: str = "QLoRA", second_name: str = "LoRA"
) -> tuple[str, str]:
    """Two runs' peak memory by the end of training, and the verdict: within ``PEAK_TOLERANCE`` is not settled.

    The peak is the rows' ``peak_mib`` (``comparison.memory_row``: the mark
    when training ended, before the test rows are predicted). Peaks are
    compared only between runs whose peaks are their own and that started
    from the same baseline (``same_baseline``); otherwise no verdict is drawn,
    and the text says why.
    """
    peaks = (first["peak_mib"], second["peak_mib"])
    if None in peaks:
        shown = " vs ".join("not its own" if peak is None else f"{peak:,.0f} MiB" for peak in peaks)
        verdict = "training peak: not measured on equal terms (a run shared its process with earlier training)"
        return f"training peak {shown}", verdict
    measured = f"training peak {peaks[0]:,.0f} vs {peaks[1]:,.0f} MiB"
    if not same_baseline(first, second):
        verdict = "training peak: not measured on equal terms (the runs started from different baselines)"
        before = f"{first['baseline_mib']:,.0f} vs {second['baseline_mib']:,.0f} MiB before loading"
        return f"{measured} ({before})", verdict
    return measured, f"training peak: {smaller(*peaks, first_name, second_name, PEAK_TOLERANCE * max(peaks))}"


def speed_verdict(
    first: dict[str, Any], second: dict[str, Any], key: str, first_name: str, second_name: str
) -> tuple[str, str]:
    """Two runs' timings (``step`` or ``latency``): their spreads and the paired test, and its verdict.

    Step times pair by step (the same batch in each run, same seed), latencies
    by text and round (``inference.interleaved_latencies_ms``).
    """
    unit, digits = ("s", 3) if key == "step" else ("ms", 0)
    spreads = {"step": "step_seconds", "latency": "latency_ms"}[key]
    test = paired_times(first[f"{key}_samples"], second[f"{key}_samples"])
    measured = f"{first[spreads].format(unit, digits)} vs {second[spreads].format(unit, digits)}; "
    return measured + test.format(unit, digits + 1), faster_paired(test, first_name, second_name)


def accuracy_measured(test: PairedTest, first: dict[str, Any], second: dict[str, Any], names: tuple[str, str]) -> str:
    """Two runs' test accuracies with McNemar's test on their rows, in words."""
    return (
        f"test {first['test_accuracy']} vs {second['test_accuracy']}; McNemar p = {test.p_value:.2g} "
        f"({test.only_first_right} rows only {names[0]} got right, {test.only_second_right} only {names[1]})"
    )


def gap_verdict(all_linear: dict[str, Any], qlora: dict[str, Any], full: dict[str, Any]) -> dict[str, str]:
    """Whether all-linear QLoRA still trails full fine-tuning where query/value QLoRA does, by McNemar's test.

    There is a gap to test only when the test finds full fine-tuning more
    accurate than query/value QLoRA. Then all-linear QLoRA against full
    fine-tuning is answered by what the test shows, with its p-value: a
    difference, or no difference found, which is not a proof that the two
    are equal (the test may miss a small one).
    """
    gap = mcnemar(qlora["correct"], full["correct"])
    test = mcnemar(all_linear["correct"], full["correct"])
    names = (ALL_LINEAR, "full fine-tuning")
    measured = f"{accuracy_measured(test, all_linear, full, names)}; {QUERY_VALUE} vs full fine-tuning: "
    measured += f"McNemar p = {gap.p_value:.2g}"
    versus_full = more_accurate(test, *names)
    found = f"{versus_full.replace(NOT_SETTLED, 'no difference found')} (McNemar p = {test.p_value:.2g})"
    if more_accurate(gap, QUERY_VALUE, "full fine-tuning") != "full fine-tuning more accurate":
        verdict = f"no gap to test: {QUERY_VALUE} is not less accurate than full fine-tuning by the test"
        verdict += f"; {ALL_LINEAR} vs full fine-tuning: {found}"
    elif versus_full == NOT_SETTLED:
        verdict = found
    elif versus_full == "full fine-tuning more accurate":
        verdict = f"yes: {found}"
    else:
        verdict = f"no: {found}"
    return {
        "question": f"Does {ALL_LINEAR} still trail full fine-tuning, as {QUERY_VALUE} does?",
        "measured": measured,
        "verdict": verdict,
    }


def all_linear_cost(all_linear: dict[str, Any], qlora: dict[str, Any]) -> dict[str, str]:
    """What adapters on every linear layer cost over query and value: parameters, step time, training peak.

    Both runs are QLoRA, so each verdict names which one (``ALL_LINEAR``, ``QUERY_VALUE``).
    """
    names = (ALL_LINEAR, QUERY_VALUE)
    step_measured, step = speed_verdict(all_linear, qlora, "step", *names)
    peak_measured, peak = peak_verdict(all_linear, qlora, *names)
    trainable = (all_linear["trainable_parameters"], qlora["trainable_parameters"])
    return {
        "question": "What do adapters on all linear layers cost QLoRA?",
        "measured": f"trainable {trainable[0]:,} vs {trainable[1]:,}; step {step_measured}; {peak_measured}",
        "verdict": f"{trainable[0] / trainable[1]:.1f}x the trainable parameters; step: {step}; {peak}",
    }


def verdicts(rows: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The questions a LoRA-vs-QLoRA table asks, each answered by its stated rule, and two on all-linear QLoRA.

    * trainable parameters: counted exactly, so equal or not;
    * memory: weights counted exactly; peaks by the end of training within
      ``PEAK_TOLERANCE`` of each other are not settled, and peaks of runs from
      different baselines are not compared;
    * training and inference speed: faster only when Wilcoxon's signed-rank
      test on the paired timings gives p < 0.05;
    * accuracy: different only when McNemar's test on the same test rows gives p < 0.05.

    The all-linear rows (``gap_verdict``, ``all_linear_cost``) come when the
    rows hold all-linear QLoRA and full fine-tuning.
    """
    found = by_method(rows)
    qlora, lora = found[QLORA.label], found[LORA.label]
    test = mcnemar(qlora["correct"], lora["correct"])
    same_trainable = qlora["trainable_parameters"] == lora["trainable_parameters"]
    peak_measured, peak = peak_verdict(qlora, lora)
    step_measured, step = speed_verdict(qlora, lora, "step", "QLoRA", "LoRA")
    latency_measured, latency = speed_verdict(qlora, lora, "latency", "QLoRA", "LoRA")
    answers = [
        {
            "question": "Does QLoRA train fewer parameters than LoRA?",
            "measured": f"{qlora['trainable_parameters']:,} vs {lora['trainable_parameters']:,}",
            "verdict": "no: the same adapters" if same_trainable else "yes",
        },
        {
            "question": "Does QLoRA need less memory than LoRA?",
            "measured": f"weights {qlora['weight_mib']:.1f} vs {lora['weight_mib']:.1f} MiB; {peak_measured}",
            "verdict": f"weights: {smaller(qlora['weight_mib'], lora['weight_mib'], 'QLoRA', 'LoRA', 0)}; {peak}",
        },
        {"question": "Does QLoRA train faster than LoRA?", "measured": f"per step {step_measured}", "verdict": step},
        {
            "question": "Is QLoRA's inference faster than LoRA's?",
            "measured": f"per text {latency_measured}",
            "verdict": latency,
        },
        {
            "question": "Does QLoRA keep LoRA's accuracy?",
            "measured": accuracy_measured(test, qlora, lora, ("QLoRA", "LoRA")),
            "verdict": more_accurate(test, "QLoRA", "LoRA").replace(NOT_SETTLED, "no difference found"),
        },
    ]
    if QLORA_ALL_LINEAR.label in found and FULL.label in found:
        all_linear = found[QLORA_ALL_LINEAR.label]
        answers += [gap_verdict(all_linear, qlora, found[FULL.label]), all_linear_cost(all_linear, qlora)]
    return answers
