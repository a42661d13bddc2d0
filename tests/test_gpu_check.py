"""The CPU side of ``tools/gpu_check.py``: arguments, the refusal without CUDA, the report's rows and its two files.

The GPU parts cannot run here (no GPU is lent to CI); these tests check what
the script does around them, with rows made by hand in the shape it writes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))

import gpu_check  # noqa: E402

from qlora_tutorial import quantization as q  # noqa: E402

DECODER_RESULTS = {"train_steps": 6, "gradient_checkpointing": True, "train_seconds": 3.456, "peak_memory_bytes": 2**20}


def decoder_scores(reload_shift: float = 0.0) -> dict[str, np.ndarray]:
    """Scores of 3 rows as the decoder part holds them: the merge moved them a little and flipped row 2's answer."""
    adapter = np.log([[0.5, 0.2, 0.2, 0.1], [0.1, 0.6, 0.2, 0.1], [0.3, 0.29, 0.21, 0.2]])
    merged = adapter + np.array([[0.01, 0, 0, 0], [0, -0.02, 0, 0], [-0.05, 0, 0, 0]])
    return {"adapter": adapter, "merged": merged, "reloaded": merged + reload_shift}


def sample_report() -> dict:
    """A report as the script writes it on a T4, with made-up timings (the format is under test, not the numbers)."""
    return {
        "started": "2026-01-01T00:00:00+00:00",
        "device": {
            "name": "Tesla T4",
            "compute_capability": "7.5",
            "compute_dtype": "float16: compute capability 7.5 has no native bf16",
            "cuda": "12.6",
            "torch": "2.13.0",
            "transformers": "5.23.0",
            "peft": "0.21.0",
            "bitsandbytes": "0.50.2",
        },
        "nf4": [
            gpu_check.nf4_row((2, 4), torch.float32, torch.zeros(8), torch.zeros(8), torch.ones(1), torch.ones(1)),
        ],
        "training": [
            gpu_check.training_row("QLoRA", "nf4-dq", torch.float16, [0.2, 0.3, 0.25], 3 * 2**20, 2**20),
        ],
        "notes": ["bf16 not measured: float16: compute capability 7.5 has no native bf16"],
        "decoder": gpu_check.decoder_row(
            DECODER_RESULTS, decoder_scores(), ["Sports", "World"], 0.0312, "float16", ["float16"], 0, 6
        ),
        "notebooks": [
            gpu_check.notebook_row("02_loading_in_4bit.ipynb", 0, 40.04, "1 passed"),
            gpu_check.notebook_row("05_testing_and_inference.ipynb", 1, 61.0, "x" * 5000 + "AssertionError"),
        ],
        "seconds": 300.0,
    }


def test_without_cuda_it_refuses_in_one_line_with_exit_status_2(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--output", str(tmp_path / "report.json")]) == 2
    captured = capsys.readouterr()
    assert captured.err == gpu_check.NO_CUDA + "\n" and captured.out == ""
    assert "torch.cuda.is_available() is False" in captured.err
    assert not (tmp_path / "report.json").exists()


def test_the_defaults_run_every_part_into_benchmarks_results():
    arguments = gpu_check.parse_args([])
    assert arguments.parts == ["notebooks", "training", "nf4", "decoder"]
    assert arguments.output == REPO / "benchmarks" / "results" / "gpu_check.json"
    assert (arguments.steps, arguments.warmup, arguments.budget, arguments.decoder_steps) == (20, 3, 450, 6)


def test_parts_and_numbers_are_checked(capsys):
    assert gpu_check.parse_args(["--parts", "nf4", "training"]).parts == ["nf4", "training"]
    bad_arguments = (["--parts", "everything"], ["--steps", "0"], ["--warmup", "-1"], ["--budget", "0"])
    for bad in (*bad_arguments, ["--decoder-steps", "0"]):
        with pytest.raises(SystemExit) as stopped:
            gpu_check.parse_args(bad)
        assert stopped.value.code == 2
    assert "--steps, --decoder-steps, --notebook-timeout and --budget must be at least 1" in capsys.readouterr().err


def test_no_data_folder_is_a_refusal_that_says_what_to_pass(tmp_path):
    with pytest.raises(gpu_check.Refusal, match=r"found no AG News folder .*pass --data-dir or set QLORA_DATA_DIR"):
        gpu_check.find_data_dir(tmp_path)


def test_the_data_folder_is_the_one_given(tmp_path):
    (tmp_path / "train.parquet").touch()
    (tmp_path / "test.parquet").touch()
    assert gpu_check.find_data_dir(tmp_path) == tmp_path.resolve()


def test_notebooks_run_under_nbval_on_the_smoke_profile_offline(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_MODEL", "bert-base-uncased")
    monkeypatch.setenv("QLORA_DECODER_MODEL", "meta-llama/Llama-3.1-8B-Instruct")
    command = gpu_check.notebook_command("04_training.ipynb")
    assert command[1:3] == ["-m", "pytest"] and "--nbval-lax" in command
    assert Path(command[3]) == REPO / "notebooks" / "04_training.ipynb"
    environment = gpu_check.notebook_environment(tmp_path / "data", tmp_path / "runs")
    assert environment["QLORA_PROFILE"] == "smoke" and environment["HF_HUB_OFFLINE"] == "1"
    assert environment["QLORA_RUNS_DIR"] == str(tmp_path / "runs") and "QLORA_MODEL" not in environment
    assert "QLORA_DECODER_MODEL" not in environment, "notebook 08 runs its packaged decoder"
    assert all((REPO / "notebooks" / name).is_file() for name in gpu_check.NOTEBOOKS)


def test_a_notebook_past_the_budget_is_reported_not_run(tmp_path):
    rows = gpu_check.run_notebooks(tmp_path, timeout=100, deadline=0.0)
    assert [row["notebook"] for row in rows] == list(gpu_check.NOTEBOOKS)
    assert all(not row["passed"] and row["exit_status"] is None and "not run" in row["tail"] for row in rows)


def test_a_failed_notebook_keeps_the_tail_of_its_output():
    passed, failed = sample_report()["notebooks"]
    assert passed == {
        "notebook": "02_loading_in_4bit.ipynb",
        "passed": True,
        "exit_status": 0,
        "seconds": 40.0,
        "tail": "",
    }
    assert not failed["passed"] and len(failed["tail"]) == gpu_check.TAIL_CHARS and failed["tail"].endswith("Error")


def test_a_training_row_adds_the_paged_state_to_the_cuda_peak():
    row = sample_report()["training"][0]
    assert row["compute_dtype"] == "float16" and row["steps"] == 3
    assert row["seconds_per_step"] == 0.25 and row["seconds_per_step_spread"] == [0.2, 0.3]
    assert row["peak_bytes"] == row["max_memory_allocated_bytes"] + row["paged_state_bytes"] == 4 * 2**20


def test_bf16_is_measured_only_where_it_is_native(fake_t4):
    assert {dtype for _, _, dtype in gpu_check.training_configurations()} == {torch.float16}


def test_an_a100_measures_both_16_bit_dtypes(fake_a100):
    configurations = gpu_check.training_configurations()
    assert [(method, precision) for method, precision, _ in configurations] == [
        ("LoRA (16-bit base)", "fp16"),
        ("QLoRA", "nf4-dq"),
        ("LoRA (16-bit base)", "bf16"),
        ("QLoRA", "nf4-dq"),
    ]
    assert [dtype for *_, dtype in configurations] == [torch.float16] * 2 + [torch.bfloat16] * 2


def test_an_nf4_row_counts_differing_codes_and_the_absmax_difference():
    weight = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    mine = q.quantize_4bit(weight)
    codes = q.unpack_4bit(mine.packed, weight.numel())
    same = gpu_check.nf4_row((4, 64), torch.float32, codes, codes.clone(), mine.absmax, mine.absmax.clone())
    assert same["bit_exact"] and same["codes_differing"] == 0 and same["absmax_equal"]
    shifted = codes.clone()
    shifted[:3] = (shifted[:3] + 1) % 16
    other = gpu_check.nf4_row((4, 64), torch.float16, codes, shifted, mine.absmax, mine.absmax * (1 + 2**-20))
    assert not other["bit_exact"] and other["codes_differing"] == 3 and not other["absmax_equal"]
    assert other["input_dtype"] == "float16" and 0 < other["absmax_max_abs_difference"] < 1e-5


def test_the_report_is_written_as_json_and_markdown(tmp_path):
    report = sample_report()
    json_path, markdown_path = gpu_check.write_report(report, tmp_path / "results" / "gpu_check.json")
    assert json.loads(json_path.read_text()) == report
    assert markdown_path == tmp_path / "results" / "gpu_check.md"
    text = markdown_path.read_text()
    assert text.startswith("# GPU check\n\nTesla T4, compute capability 7.5, CUDA 12.6;")
    assert "| 02_loading_in_4bit.ipynb | passed | 40.0 |" in text
    assert "| 05_testing_and_inference.ipynb | FAILED | 61.0 |" in text
    assert "| QLoRA | nf4-dq | float16 | 0.2500 | 3 | 1.0 | 4 |" in text
    assert "| 2x4 | float32 | 0 of 8 | yes | 0 | yes |" in text
    assert "bf16 not measured" in text
    assert "## Decoder recipe: tiny random Llama" in text and "| merged_vs_adapter_same_answers | 2 |" in text
    verdict = (
        "notebooks: 1 of 2 passed (failed: 05_testing_and_inference.ipynb); decoder recipe: passed; "
        "NF4 on CUDA: bit-exact with notebook 01"
    )
    assert text.rstrip().endswith(f"**{verdict}**")


def test_the_exit_status_is_1_only_when_a_notebook_or_the_decoder_run_failed():
    report = sample_report()
    assert gpu_check.exit_status(report) == 1
    report["notebooks"] = report["notebooks"][:1]
    assert gpu_check.exit_status(report) == 0
    report["decoder"] = gpu_check.failed_decoder_row(RuntimeError("CUDA error: out of memory"))
    assert gpu_check.exit_status(report) == 1 and "decoder recipe: FAILED" in gpu_check.verdict(report)
    assert report["decoder"]["error"] == "RuntimeError: CUDA error: out of memory"
    report["decoder"] = gpu_check.decoder_row(
        DECODER_RESULTS, decoder_scores(), ["x"], 0.03, "float16", ["float16"], 0, 6
    )
    report["nf4"][0]["bit_exact"] = False
    assert gpu_check.exit_status(report) == 0 and "differs from notebook 01" in gpu_check.verdict(report)


def test_make_gpu_check_is_listed_and_runs_the_script():
    makefile = (REPO / "Makefile").read_text()
    phony = next(line for line in makefile.splitlines() if line.startswith(".PHONY:"))
    assert "gpu-check" in phony.split()
    assert "\n## gpu-check: " in makefile
    assert "gpu-check: $(STAMP)\n\t$(BIN)/python tools/gpu_check.py" in makefile


def test_a_decoder_row_reports_the_merges_differences_as_findings():
    row = sample_report()["decoder"]
    assert row["passed"] and row["rows"] == 3 and row["merged_vs_adapter_same_answers"] == 2
    assert row["merged_vs_adapter_max_score_difference"] == 0.05 and row["reloaded_merge_max_score_difference"] == 0
    assert (row["merge_dtype"], row["train_seconds"], row["gradient_checkpointing"]) == ("float16", 3.46, True)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"steps": 8}, "fewer steps trained than asked"),
        ({"checkpoints_left": 1}, "a finished run left a checkpoint"),
        ({"merged_dtypes": ["float16", "float32"]}, "part of the merge is not in the compute dtype"),
        ({"scores": decoder_scores(reload_shift=0.01)}, "the reloaded merge scores differently"),
        ({"answers": []}, "nothing generated"),
    ],
)
def test_a_decoder_row_fails_when_a_step_did_not_do_what_it_should(change, why):
    arguments = {
        "results": DECODER_RESULTS,
        "scores": decoder_scores(),
        "answers": ["World"],
        "rounding_error": 0.03,
        "merge_dtype": "float16",
        "merged_dtypes": ["float16"],
        "checkpoints_left": 0,
        "steps": 6,
    }
    assert gpu_check.decoder_row(**arguments)["passed"]
    assert not gpu_check.decoder_row(**{**arguments, **change})["passed"], why


@pytest.mark.slow
def test_the_decoder_part_runs_the_recipe_end_to_end(tiny_data_dir):
    """On this CPU the `gpu` profile runs on the CPU in fp32: the same steps as on a GPU, where it runs in 16 bit."""
    row = gpu_check.run_decoder(tiny_data_dir, steps=2)
    assert row["passed"], row
    assert row["train_steps"] == 2 and row["gradient_checkpointing"] is True, "the gpu profile's"
    assert row["merge_dtype"] == "float32" and row["merged_parameter_dtypes"] == ["float32"]
    assert row["merged_vs_adapter_max_score_difference"] < 1e-3 and row["merged_vs_adapter_same_answers"] == row["rows"]
