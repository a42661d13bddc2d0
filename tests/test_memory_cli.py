"""``python -m qlora_tutorial measure`` and ``fits``: a run, the refusal before anything is allocated, bad input."""

from __future__ import annotations

import json

import pytest

from qlora_tutorial import memory_cli, scale_runs
from qlora_tutorial.__main__ import main
from qlora_tutorial.cli_types import EXIT_USER_ERROR
from qlora_tutorial.estimator import get_gpu
from qlora_tutorial.memory_cli import gpu_compute_dtype

TINY_RUN = ["measure", "--shape", "tiny-llama", "--method", "lora-fp32", "--steps", "2", "--seq-len", "16"]


def test_measure_prints_one_json_line_with_the_prediction(capsys: pytest.CaptureFixture[str]):
    assert main([*TINY_RUN, "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    results = json.loads(lines[0])
    assert results["shape"] == "tiny-llama" and results["method"] == "lora-fp32" and results["steps"] == 2
    assert results["predicted_bytes"] == sum(results["predicted_parts"].values())


def test_measure_prints_a_summary_without_json(capsys: pytest.CaptureFixture[str]):
    assert main(TINY_RUN) == 0
    out = capsys.readouterr().out
    assert "tiny-llama, lora-fp32 (fp32, random)" in out
    assert "predicted" in out and "s/step" in out


def test_a_run_that_would_not_fit_is_refused_before_anything_is_built(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(memory_cli, "available_bytes", lambda: int(22.9 * 2**30))  # this machine, about

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("a refused run was started")

    monkeypatch.setattr(scale_runs, "measure_run", never)
    assert main(["measure", "--shape", "smollm2-1.7b", "--method", "full"]) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1
    assert error.startswith("error: full fine-tuning of smollm2-1.7b needs ")
    assert error.endswith("this machine has 22.9 GiB available (margin 10%): predicted only")


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["measure", "--shape", "gpt-5", "--method", "qlora"], "Unknown shape 'gpt-5'. Known shapes: tiny-llama"),
        (["measure", "--shape", "tiny-llama", "--method", "dora"], "Unknown method 'dora'"),
        (["measure", "--shape", "tiny-llama", "--method", "lora-fp32", "--compute-dtype", "bf16"], "computes in fp32"),
        (["measure", "--shape", "tiny-llama", "--method", "full", "--quantize-while-loading"], "not full's"),
        (["fits", "--shape", "llama-3-8b", "--gpu", "Voodoo2"], "Voodoo2"),
    ],
)
def test_bad_input_ends_in_one_error_line(arguments: list[str], message: str, capsys: pytest.CaptureFixture[str]):
    assert main(arguments) == EXIT_USER_ERROR
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1


@pytest.mark.parametrize("option", [["--steps", "-1"], ["--seq-len", "0"], ["--margin", "1.5"]])
def test_numbers_out_of_range_are_refused_by_the_parser(option: list[str], capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit) as exit_status:
        main([*TINY_RUN, *option])
    assert exit_status.value.code == EXIT_USER_ERROR
    assert "error:" in capsys.readouterr().err


def test_fits_prints_the_parts_and_the_verdict_for_a_gpu(capsys: pytest.CaptureFixture[str]):
    assert main(["fits", "--shape", "llama-3-8b", "--gpu", "T4", "--seq-len", "1024", "--batch-size", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("QLoRA (fp16 compute) of llama-3-8b, batch 2 x 1024")  # a T4 has no native bf16
    assert "weights" in out and "total" in out and "a T4 has 14.7 GiB available" in out


def test_fits_without_a_gpu_asks_this_machine(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    monkeypatch.setattr(memory_cli, "available_bytes", lambda: 8 * 2**30)
    assert main(["fits", "--shape", "smollm2-1.7b", "--method", "lora-fp32"]) == 0
    assert "this machine has 8.0 GiB available (margin 10%): " in capsys.readouterr().out


def test_16bit_methods_compute_in_bf16_from_compute_capability_8():
    assert gpu_compute_dtype(get_gpu("T4"), "qlora") == "fp16"
    assert gpu_compute_dtype(get_gpu("A100 40GB"), "lora-bf16") == "bf16"
    assert gpu_compute_dtype(get_gpu("T4"), "lora-fp32") is None
