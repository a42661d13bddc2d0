"""End to end: the command-line pipeline on the smoke profile, real MiniLM, real 4-bit NF4 on the CPU."""

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from qlora_tutorial.modeling import Precision
from qlora_tutorial.pipeline import check_method, final_validation, format_summary, method_name

RELOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from qlora_tutorial.data import load_splits, tokenize_splits
    from qlora_tutorial.modeling import load_adapter, load_classifier, load_tokenizer
    from qlora_tutorial.settings import load_settings
    from qlora_tutorial.training import make_trainer

    adapter_dir, data_dir, scratch = sys.argv[1:4]
    settings = load_settings("smoke", data_dir=data_dir)
    tokenizer = load_tokenizer(settings)
    tokenized = tokenize_splits(load_splits(settings), tokenizer, settings.profile.max_length)
    model = load_adapter(load_classifier(settings, "nf4-dq"), adapter_dir)
    trainer = make_trainer(model, settings, tokenized, tokenizer, scratch)
    print(json.dumps(trainer.evaluate(tokenized["test"], metric_key_prefix="test")))
    """
)


def run_module(*arguments, **kwargs):
    return subprocess.run([sys.executable, *arguments], capture_output=True, text=True, **kwargs)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, ag_news_dir):
    output_dir = tmp_path_factory.mktemp("smoke_run")
    finished = run_module(
        "-m",
        "qlora_tutorial",
        "train",
        "--profile",
        "smoke",
        "--output-dir",
        str(output_dir),
        "--data-dir",
        str(ag_news_dir),
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    return output_dir, finished.stdout, json.loads((output_dir / "results.json").read_text())


def test_smoke_run_learns(smoke_run):
    _, stdout, results = smoke_run
    assert results["method"] == "QLoRA (nf4-dq)"
    assert results["validation_accuracy"] > 0.6, "four balanced classes: chance is 0.25"
    assert results["test_accuracy"] > 0.6
    assert "test accuracy" in stdout and "peak memory" in stdout


def test_smoke_run_reports_what_it_measured(smoke_run):
    output_dir, _, results = smoke_run
    assert results["rows"] == {"train": 320, "validation": 80, "test": 200}
    assert results["trainable_parameters"] == 8 * (384 + 384) * 2 * 6 + 384 * 4 + 4
    assert 0 < results["quant_state_bytes"] < results["weight_bytes"] < 4 * results["total_parameters"]
    assert results["versions"]["bitsandbytes"] == "0.50.2"
    assert any("eval_accuracy" in entry for entry in results["log_history"])
    assert (output_dir / "adapter_model.safetensors").is_file() and (output_dir / "adapter_config.json").is_file()


def test_adapter_reloads_in_a_new_process_with_the_same_predictions(smoke_run, ag_news_dir, tmp_path):
    output_dir, _, results = smoke_run
    finished = run_module("-c", RELOAD_SCRIPT, str(output_dir), str(ag_news_dir), str(tmp_path))
    assert finished.returncode == 0, finished.stderr[-3000:]
    reloaded = json.loads(finished.stdout.strip().splitlines()[-1])
    assert reloaded["test_accuracy"] == results["test_accuracy"]
    assert reloaded["test_macro_f1"] == results["test_macro_f1"]


def test_unknown_profile_exits_non_zero_with_the_valid_ones():
    finished = run_module("-m", "qlora_tutorial", "train", "--profile", "huge")
    assert finished.returncode == 2
    assert "Unknown profile 'huge'. Valid profiles: smoke, cpu, gpu" in finished.stderr


def test_bad_precision_exits_non_zero():
    finished = run_module("-m", "qlora_tutorial", "train", "--profile", "smoke", "--precision", "int3")
    assert finished.returncode == 2 and "Valid precisions" in finished.stderr


def test_full_fine_tuning_of_quantized_weights_is_refused():
    with pytest.raises(ValueError, match="Use --precision fp32"):
        check_method(Precision.NF4, use_lora=False)
    check_method(Precision.FP32, use_lora=False)


def test_method_names():
    assert method_name(Precision.NF4_DQ, True) == "QLoRA (nf4-dq)"
    assert method_name(Precision.FP32, True) == "LoRA (fp32 base)"
    assert method_name(Precision.FP32, False) == "full fine-tuning (fp32)"


def test_summary_formats_a_results_file(smoke_run):
    _, _, results = smoke_run
    summary = format_summary(results)
    assert "validation accuracy" in summary and f"{results['test_accuracy']:.2%}" in summary


def test_final_validation_reuses_the_last_steps_evaluation():
    history = [{"eval_accuracy": 0.5, "step": 20}, {"loss": 1.0, "step": 40}, {"eval_accuracy": 0.8, "step": 40}]
    state = SimpleNamespace(global_step=40, log_history=[*history, {"train_runtime": 3.0, "step": 40}])
    assert final_validation(SimpleNamespace(state=state))["eval_accuracy"] == 0.8
    state.log_history = history[:2]
    assert final_validation(SimpleNamespace(state=state)) is None, "no evaluation at the last step: evaluate again"
