"""Notebook 09's ladder: its profiles, its specs, the run-or-predict rows, their table and their figure.

The rows' logic is checked on hand-made inputs: a predicted-only row is made
with an ``available_bytes`` too small for anything, and the fresh process is
replaced by a stand-in that fails the test if it is started. One slow test
runs the smallest shape for real in a fresh process, and one measures a fresh
process's resident set (``scale_runs.process_baseline_bytes``); the table and
the figure are built from rows written out here, so every number is known.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pytest
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from qlora_tutorial import ladder_runs, scale_profile, scale_runs
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import METHODS, TRAINING_OVERHEAD_BYTES, RunSpec, estimate_peak
from qlora_tutorial.ladder_plot import METHOD_STYLES, plot_memory_ladder
from qlora_tutorial.ladder_runs import ladder_specs, ladder_table, run_or_predict
from qlora_tutorial.scale_profile import SCALE_PROFILES, ScaleProfile
from qlora_tutorial.scale_runs import process_baseline_bytes, scale_spec
from qlora_tutorial.settings import PROFILES, load_settings
from qlora_tutorial.shapes import DECODER_SHAPES, get_decoder_shape

MIB, GIB = 2**20, 2**30
TINY = get_decoder_shape("tiny-llama")
WIDE = get_decoder_shape("tiny-llama-wide")
PROCESS = 500 * MIB  # a fresh process's resident set, given so that no process is started to measure it


def tiny_spec(method: str = "lora-fp32", **changes: Any) -> RunSpec:
    return scale_spec(TINY, method, **{"seq_len": 16, **changes})


def no_fresh_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the ladder starts a measured run or measures the process baseline."""

    def started(*args: object, **kwargs: object) -> None:
        pytest.fail("a process was started for a run that should only be predicted")

    monkeypatch.setattr(ladder_runs, "measure_in_fresh_process", started)
    monkeypatch.setattr(ladder_runs, "process_baseline_bytes", started)


def fake_run(peak: int, *, steps: int = 3) -> dict[str, Any]:
    """What ``measure_in_fresh_process`` returns, reduced to the keys a ladder row reads."""
    trained = steps > 0
    return {
        "steps": steps,
        "peak_bytes": peak,
        "peak_anon_bytes": peak - 300 * MIB,
        "load": {"file_bytes": 100 * MIB},
        "train": {"file_bytes": 150 * MIB} if trained else None,
        "median_step_seconds": 0.25 if trained else None,
    }


def ladder_row(shape: str, method: str, predicted: int, measured: int | None, **measured_parts: Any) -> dict[str, Any]:
    """A row as ``run_or_predict`` writes it: predicted only where ``measured`` is None."""
    ran = measured is not None
    return {
        "shape": shape,
        "parameters": get_decoder_shape(shape).parameters,
        "method": method,
        "compute dtype": measured_parts.get("compute_dtype", "fp32"),
        "checkpointing": True,
        "predicted_bytes": predicted,
        "measured_bytes": measured,
        "anon_bytes": measured_parts.get("anon") if ran else None,
        "file_bytes": measured_parts.get("file") if ran else None,
        "step_seconds": measured_parts.get("seconds") if ran else None,
        "error": (predicted - measured) / measured if ran else None,
        "run": None,
        "line": "",
    }


# --- scale_profile ---------------------------------------------------------------------------------------------


def test_every_profile_of_the_series_has_a_ladder():
    assert set(SCALE_PROFILES) == set(PROFILES)


@pytest.mark.parametrize("name", list(SCALE_PROFILES))
def test_each_ladder_climbs_known_shapes_and_repeats_runs_of_its_own(name: str):
    ladder = SCALE_PROFILES[name]
    assert all(shape in DECODER_SHAPES for shape in ladder.shapes), ladder.shapes
    sizes = [DECODER_SHAPES[shape].parameters for shape in ladder.shapes]
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes), "smallest first, no shape twice"
    assert ladder.checkpointing_pair in ladder.shapes
    assert ladder.load_comparison_shape in ladder.shapes
    assert ladder.steps >= 1 and 0 <= ladder.margin < 1


@pytest.mark.parametrize("listed", [True, False])
def test_the_profile_table_prints_the_machine_then_every_field(monkeypatch: pytest.MonkeyPatch, listed: bool):
    monkeypatch.setattr(scale_profile, "cpu_lists_avx512_bf16", lambda: listed)
    settings = load_settings("smoke")
    ladder = SCALE_PROFILES["smoke"]
    printed = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in ladder.table(settings).splitlines())
    fields = {field.name: str(getattr(ladder, field.name)) for field in dataclasses.fields(ScaleProfile)}
    assert list(printed) == ["profile", "device", "CPU lists avx512_bf16", "memory", *fields]
    assert printed["profile"] == f"smoke ({settings.profile.purpose})"
    assert printed["device"] == settings.device
    assert printed["CPU lists avx512_bf16"] == ("yes" if listed else "no")
    assert re.fullmatch(r"\d+\.\d GiB, \d+\.\d GiB available now", printed["memory"]), printed["memory"]
    assert {name: printed[name] for name in fields} == fields


def test_a_ladder_changes_only_the_fields_asked_for():
    settings = load_settings("smoke")
    changed = scale_profile.scale_profile(settings, steps=1)
    assert changed == dataclasses.replace(SCALE_PROFILES["smoke"], steps=1)
    assert changed.steps == 1 and SCALE_PROFILES["smoke"].steps == 2, "the shared profile is left as it was"
    assert scale_profile.scale_profile(settings) == SCALE_PROFILES["smoke"]


# --- ladder_specs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("listed", "qlora_dtype"), [(True, "bf16"), (False, "fp32")])
def test_the_ladder_runs_every_method_on_every_shape_with_the_profiles_batch(
    monkeypatch: pytest.MonkeyPatch, listed: bool, qlora_dtype: str
):
    monkeypatch.setattr(scale_runs, "cpu_lists_avx512_bf16", lambda: listed)
    ladder = dataclasses.replace(SCALE_PROFILES["smoke"], batch_size=2, seq_len=24, lora_r=4)
    specs = ladder_specs(ladder)
    assert [(spec.shape.name, spec.method) for spec in specs] == [
        (shape, method) for shape in ladder.shapes for method in METHODS
    ]
    assert {(spec.batch_size, spec.seq_len, spec.lora_r) for spec in specs} == {(2, 24, 4)}
    assert all(spec.gradient_checkpointing and spec.device == "cpu" for spec in specs)
    dtypes = {spec.method: spec.compute_dtype for spec in specs}
    assert dtypes == {"full": "fp32", "lora-fp32": "fp32", "lora-bf16": "bf16", "qlora": qlora_dtype}


def test_the_published_ladder_starts_with_its_smallest_shape():
    sizes = [spec.shape.parameters for spec in ladder_specs(SCALE_PROFILES["cpu"])]
    assert sizes == sorted(sizes) and sizes[0] == get_decoder_shape("smollm2-135m").parameters


# --- run_or_predict --------------------------------------------------------------------------------------------


def test_a_run_that_does_not_fit_is_predicted_only_and_says_so(monkeypatch: pytest.MonkeyPatch):
    no_fresh_process(monkeypatch)
    spec = tiny_spec("qlora", compute_dtype="fp32")
    row = run_or_predict(spec, 3, 0.10, available_bytes=100 * MIB, process_bytes=PROCESS)
    predicted = estimate_peak(spec, PROCESS).total_bytes
    assert row["predicted_bytes"] == predicted
    assert (row["shape"], row["parameters"], row["method"]) == ("tiny-llama", TINY.parameters, "QLoRA")
    assert (row["compute dtype"], row["checkpointing"]) == ("fp32", True)
    ran = ("measured_bytes", "anon_bytes", "file_bytes", "step_seconds", "error", "run")
    assert {key: row[key] for key in ran} == dict.fromkeys(ran)
    assert row["line"] == (
        f"QLoRA of tiny-llama needs {predicted / GIB:.1f} GiB, this machine has 0.1 GiB available "
        "(margin 10%): predicted only"
    )


def test_the_process_baseline_moves_the_prediction_byte_for_byte(monkeypatch: pytest.MonkeyPatch):
    no_fresh_process(monkeypatch)
    rows = [run_or_predict(tiny_spec(), 1, 0.10, MIB, process_bytes=PROCESS + extra) for extra in (0, 12_345)]
    assert rows[1]["predicted_bytes"] - rows[0]["predicted_bytes"] == 12_345


def test_without_a_process_baseline_the_one_measured_here_is_used(monkeypatch: pytest.MonkeyPatch):
    no_fresh_process(monkeypatch)
    monkeypatch.setattr(ladder_runs, "process_baseline_bytes", lambda: 777 * MIB)
    row = run_or_predict(tiny_spec(), 1, 0.10, available_bytes=MIB)
    assert row["predicted_bytes"] == estimate_peak(tiny_spec(), 777 * MIB).total_bytes


def test_a_run_that_fits_is_run_once_and_its_measurements_fill_the_row(monkeypatch: pytest.MonkeyPatch):
    calls: list[tuple[RunSpec, int, float | None]] = []

    def measured(spec: RunSpec, steps: int, margin: float | None = None) -> dict[str, Any]:
        calls.append((spec, steps, margin))
        return fake_run(800 * MIB)

    monkeypatch.setattr(ladder_runs, "measure_in_fresh_process", measured)
    spec = tiny_spec()
    row = run_or_predict(spec, 3, 0.10, available_bytes=64 * GIB, process_bytes=PROCESS)
    predicted = estimate_peak(spec, PROCESS).total_bytes
    assert calls == [(spec, 3, 0.10)]  # the child checks with the caller's margin
    assert row["measured_bytes"] == 800 * MIB and row["anon_bytes"] == 500 * MIB
    assert row["file_bytes"] == 150 * MIB, "the larger of the load's and the training's file-backed pages"
    assert row["step_seconds"] == 0.25 and row["run"] == fake_run(800 * MIB)
    assert row["error"] == (predicted - 800 * MIB) / (800 * MIB)
    assert row["line"] == (
        f"{spec.describe()}: predicted {predicted / GIB:.2f} GiB, measured 0.78 GiB ({row['error']:+.1%}), 0.25 s/step"
    )


def test_zero_steps_are_refused_with_what_to_call_instead():
    with pytest.raises(UserInputError, match=r"at least one step, got 0.*measure_in_fresh_process\(spec, 0\)"):
        run_or_predict(tiny_spec(), 0, 0.10, available_bytes=64 * GIB, process_bytes=PROCESS)


@pytest.mark.slow
def test_the_smallest_run_that_fits_runs_in_a_fresh_process():
    spec = tiny_spec()
    row = run_or_predict(spec, 1, 0.10, available_bytes=64 * GIB)
    measured = row["measured_bytes"]
    assert isinstance(measured, int) and measured > 0
    assert row["predicted_bytes"] == estimate_peak(spec, process_baseline_bytes()).total_bytes
    assert row["error"] == (row["predicted_bytes"] - measured) / measured
    assert abs(row["error"]) < 0.25, f"{row['line']}: the estimator is calibrated to about 10% on this shape"
    assert row["step_seconds"] > 0 and row["run"]["steps"] == 1 and row["run"]["method"] == "lora-fp32"
    assert row["line"].startswith(f"{spec.describe()}: predicted ") and row["line"].endswith(" s/step")


# --- process_baseline_bytes ------------------------------------------------------------------------------------


def test_the_process_baseline_is_the_childs_last_line_in_the_measured_runs_environment(
    monkeypatch: pytest.MonkeyPatch,
):
    seen: dict[str, Any] = {}

    def finished(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.update(command=command, env=kwargs["env"])
        return subprocess.CompletedProcess(command, 0, stdout="a warning\n123456789\n", stderr="")

    monkeypatch.setattr(scale_runs.subprocess, "run", finished)
    assert process_baseline_bytes.__wrapped__() == 123_456_789  # past the cache, so nothing real is kept or lost
    assert seen["command"][1:] == ["-c", scale_runs.BASELINE_PROGRAM]
    assert seen["env"]["MALLOC_MMAP_THRESHOLD_"] == scale_runs.FIXED_MMAP_THRESHOLD["MALLOC_MMAP_THRESHOLD_"]
    failed = subprocess.CompletedProcess([], 1, stdout="", stderr="ImportError: no torch")
    monkeypatch.setattr(scale_runs.subprocess, "run", lambda command, **kwargs: failed)
    with pytest.raises(RuntimeError, match=r"(?s)failed \(exit 1\).*no torch"):
        process_baseline_bytes.__wrapped__()


@pytest.mark.slow
def test_the_process_baseline_is_measured_once_and_plausible():
    baseline = process_baseline_bytes()
    assert isinstance(baseline, int) and 100 * MIB < baseline < 4 * GIB
    assert process_baseline_bytes() == baseline and process_baseline_bytes.cache_info().hits >= 1
    assert estimate_peak(tiny_spec(), baseline).parts["runtime"] == baseline + TRAINING_OVERHEAD_BYTES


# --- ladder_table ----------------------------------------------------------------------------------------------


def test_the_table_gives_gib_with_two_decimals_and_dashes_where_nothing_ran():
    parts = {"anon": GIB, "file": GIB // 4, "seconds": 0.456, "compute_dtype": "bf16"}
    measured = ladder_row("tiny-llama", "QLoRA", int(1.5 * GIB), int(1.25 * GIB), **parts)
    predicted_only = ladder_row("tiny-llama-wide", "full fine-tuning", int(27.5 * GIB), None)
    table = ladder_table([measured, predicted_only])
    assert list(table.index) == [("tiny-llama", "QLoRA (bf16)"), ("tiny-llama-wide", "full fine-tuning")]
    assert table.to_dict("records") == [
        {
            "predicted (GiB)": "1.50",
            "measured (GiB)": "1.25",
            "anon / file (GiB)": "1.00 / 0.25",
            "error": "+20.0%",
            "s/step": "0.46",
        },
        {
            "predicted (GiB)": "27.50",
            "measured (GiB)": "-",
            "anon / file (GiB)": "-",
            "error": "predicted only",
            "s/step": "-",
        },
    ]


# --- plot_memory_ladder ----------------------------------------------------------------------------------------

ROWS = [
    ladder_row("tiny-llama", "QLoRA", 700 * MIB, 650 * MIB, seconds=0.2),
    ladder_row("tiny-llama-wide", "QLoRA", 900 * MIB, None),
    ladder_row("tiny-llama", "full fine-tuning", 800 * MIB, 750 * MIB, seconds=0.3),
    ladder_row("tiny-llama-wide", "full fine-tuning", 1200 * MIB, 1300 * MIB, seconds=0.5),
]
MEMORY_LINES = {"this machine, available": 2 * GIB, "T4, usable": 14.74 * GIB}


@pytest.fixture
def ladder_figure():
    """The ladder figure of ``ROWS``, drawn, closed after the test."""
    figure = plot_memory_ladder(ROWS, MEMORY_LINES, "the ladder")
    figure.canvas.draw()
    yield figure
    plt.close(figure)


def method_line(axis: Axes, method: str) -> Line2D:
    (line,) = [line for line in axis.get_lines() if line.get_label() == method]
    return line


def markers(axis: Axes, method: str) -> list[tuple[float, float, bool]]:
    """(parameters, GiB, filled) of each point marker drawn in the method's colour."""
    style = METHOD_STYLES[method]
    return [
        (line.get_xdata()[0], line.get_ydata()[0], line.get_markerfacecolor() != "white")
        for line in axis.get_lines()
        if len(line.get_xdata()) == 1 and line.get_marker() == style["marker"] and line.get_color() == style["color"]
    ]


def test_the_ladder_figure_draws_memory_and_time_on_log_axes(ladder_figure: Figure):
    memory, time = ladder_figure.axes
    assert ladder_figure.get_suptitle() == "the ladder"
    for axis in (memory, time):
        assert axis.get_xscale() == axis.get_yscale() == "log" and axis.get_xlabel() and axis.get_ylabel()
        assert list(axis.get_xticks()) == [TINY.parameters, WIDE.parameters]
        assert [label.get_text() for label in axis.get_xticklabels()] == ["tiny-llama\n0.00B", "tiny-llama-wide\n0.00B"]
    assert [text.get_text() for text in memory.get_legend().get_texts()] == ["full fine-tuning", "QLoRA"]


def test_measured_points_are_filled_and_predicted_only_ones_hollow_at_their_prediction(ladder_figure: Figure):
    memory, _ = ladder_figure.axes
    qlora = method_line(memory, "QLoRA")
    assert list(qlora.get_xdata()) == [TINY.parameters, WIDE.parameters]
    assert list(qlora.get_ydata()) == [650 / 1024, 900 / 1024], "measured where it ran, else predicted"
    assert markers(memory, "QLoRA") == [(TINY.parameters, 650 / 1024, True), (WIDE.parameters, 900 / 1024, False)]
    full = [(TINY.parameters, 750 / 1024, True), (WIDE.parameters, 1300 / 1024, True)]
    assert markers(memory, "full fine-tuning") == full
    labels = {line.get_label() for line in memory.get_lines()}
    assert not labels & {"LoRA on an fp32 base", "LoRA on a bf16 base"}, "a method without rows is left out"


def test_only_runs_that_ran_are_timed(ladder_figure: Figure):
    _, time = ladder_figure.axes
    qlora, full = method_line(time, "QLoRA"), method_line(time, "full fine-tuning")
    assert list(qlora.get_xdata()) == [TINY.parameters] and list(qlora.get_ydata()) == [0.2]
    assert list(full.get_ydata()) == [0.3, 0.5]


def test_the_memories_are_dashed_lines_labelled_with_their_gib(ladder_figure: Figure):
    memory, _ = ladder_figure.axes
    dashed = {line.get_ydata()[0]: line.get_color() for line in memory.get_lines() if line.get_linestyle() == "--"}
    assert sorted(dashed.items()) == [(2.0, "tab:red"), (14.74, "gray")]
    texts = [text.get_text().strip() for text in memory.texts]
    assert texts == ["this machine, available (2.0 GiB)", "T4, usable (14.7 GiB)"]
