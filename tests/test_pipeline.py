"""End to end: the command-line pipeline on the smoke profile, real MiniLM, real 4-bit NF4 on the CPU."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
from contextlib import redirect_stdout
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from qlora_tutorial.__main__ import main
from qlora_tutorial.modeling import Precision
from qlora_tutorial.pipeline import check_method, format_summary, method_name
from qlora_tutorial.settings import MODEL_ENV
from qlora_tutorial.training import final_validation

RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from qlora_tutorial.data import load_splits
    from qlora_tutorial.inference import load_trained, predict_proba
    from qlora_tutorial.modeling import load_tokenizer
    from qlora_tutorial.settings import load_settings

    adapter_dir, data_dir = sys.argv[1:3]
    settings = load_settings("smoke", data_dir=data_dir)
    texts = list(load_splits(settings)["test"]["text"])
    probabilities = predict_proba(load_trained(settings, adapter_dir), load_tokenizer(settings), texts)
    print(json.dumps(probabilities.tolist()))
    """
)


@dataclass(frozen=True)
class SmokeRun:
    """What `python -m qlora_tutorial train --profile smoke` left: its folder, what it printed, its results."""

    output_dir: Path
    stdout: str
    results: dict[str, Any]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory, ag_news_dir: Path) -> SmokeRun:
    """The command line's run, in this process (the one subprocess test of the CLI is in test_cli.py)."""
    output_dir = tmp_path_factory.mktemp("smoke_run")
    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(printed):
        patch.delenv(MODEL_ENV, raising=False)
        status = main(["train", "--profile", "smoke", "--output-dir", str(output_dir), "--data-dir", str(ag_news_dir)])
    assert status == 0
    return SmokeRun(output_dir, printed.getvalue(), json.loads((output_dir / "results.json").read_text()))


@pytest.mark.slow
def test_smoke_run_learns(smoke_run: SmokeRun) -> None:
    assert smoke_run.results["method"] == "QLoRA (nf4-dq)"
    assert smoke_run.results["validation_accuracy"] > 0.6, "four balanced classes: chance is 0.25"
    assert smoke_run.results["test_accuracy"] > 0.6
    assert "test accuracy" in smoke_run.stdout and "peak memory" in smoke_run.stdout


@pytest.mark.slow
def test_smoke_run_reports_what_it_measured(smoke_run: SmokeRun) -> None:
    results = smoke_run.results
    assert results["rows"] == {"train": 320, "validation": 80, "test": 200}
    assert results["trainable_parameters"] == 8 * (384 + 384) * 2 * 6 + 384 * 4 + 4
    assert 0 < results["quant_state_bytes"] < results["weight_bytes"] < 4 * results["total_parameters"]
    assert results["versions"]["bitsandbytes"] == version("bitsandbytes")
    assert any("eval_accuracy" in entry for entry in results["log_history"])
    assert (smoke_run.output_dir / "adapter_model.safetensors").is_file()
    assert (smoke_run.output_dir / "adapter_config.json").is_file()


@pytest.mark.slow
def test_adapter_reloads_in_a_new_process_with_the_same_predictions(smoke_run: SmokeRun, ag_news_dir: Path) -> None:
    """The classes the trained model predicted for the test rows (results.json) are the reloaded adapter's."""
    trained = np.array(smoke_run.results["test_predictions"])
    finished = subprocess.run(
        [sys.executable, "-c", RELOAD_SCRIPT, str(smoke_run.output_dir), str(ag_news_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    reloaded = np.array(json.loads(finished.stdout.strip().splitlines()[-1])).argmax(axis=1)
    assert reloaded.shape == trained.shape == (200,)
    assert (reloaded == trained).all(), f"{(reloaded != trained).sum()} of 200 test rows predicted otherwise"


@pytest.mark.slow
def test_summary_formats_a_results_file(smoke_run: SmokeRun) -> None:
    summary = format_summary(smoke_run.results)
    assert "validation accuracy" in summary and f"{smoke_run.results['test_accuracy']:.2%}" in summary


def test_full_fine_tuning_of_quantized_weights_is_refused() -> None:
    with pytest.raises(ValueError, match="Use --precision fp32"):
        check_method(Precision.NF4, use_lora=False)
    check_method(Precision.FP32, use_lora=False)


def test_final_validation_reuses_the_last_steps_evaluation() -> None:
    history = [{"eval_accuracy": 0.5, "step": 20}, {"loss": 1.0, "step": 40}, {"eval_accuracy": 0.8, "step": 40}]
    state = SimpleNamespace(global_step=40, log_history=[*history, {"train_runtime": 3.0, "step": 40}])
    assert final_validation(SimpleNamespace(state=state))["eval_accuracy"] == 0.8
    state.log_history = history[:2]
    assert final_validation(SimpleNamespace(state=state)) is None, "no evaluation at the last step: evaluate again"


def test_a_method_name_says_where_the_adapters_are_unless_on_query_and_value() -> None:
    assert method_name(Precision.NF4_DQ, True) == method_name(Precision.NF4_DQ, True, {"value", "query"})
    assert method_name(Precision.NF4_DQ, True) == "QLoRA (nf4-dq)"
    assert method_name(Precision.NF4_DQ, True, "all-linear") == "QLoRA (nf4-dq, all linear layers)"
    assert method_name(Precision.FP32, True, ["value", "key"]) == "LoRA (fp32 base, on key, value)"
    assert method_name(Precision.FP32, False) == "full fine-tuning (fp32)"
