"""One measured run of a shape and method: the model each method trains, what the run records, its fresh process."""

from __future__ import annotations

import subprocess
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch

from qlora_tutorial import scale_runs
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import RunSpec
from qlora_tutorial.quantized_checkpoint import ensure_random_checkpoint
from qlora_tutorial.scale_runs import (
    base_checkpoint,
    build_for_method,
    check_spec,
    cpu_compute_dtype,
    measure_command,
    measure_in_fresh_process,
    measure_run,
    random_model,
    scale_spec,
)
from qlora_tutorial.shapes import get_decoder_shape

TINY = get_decoder_shape("tiny-llama")


def tiny_spec(method: str, compute_dtype: str | None = None, **changes: object) -> RunSpec:
    return scale_spec(TINY, method, compute_dtype=compute_dtype, **{"seq_len": 16, **changes})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny shape's saved 4-bit checkpoint and its bf16 twin, built here rather than in a child process."""
    root = tmp_path_factory.mktemp("checkpoints")
    for precision in ("nf4-dq", "bf16"):
        ensure_random_checkpoint(TINY, root, precision, fresh_process=False)
    return root


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_models_are_seeded_drawn_once_as_llama_draws_them_and_keep_their_ties(dtype: torch.dtype):
    first, second = random_model(tiny_spec("full"), dtype), random_model(tiny_spec("full"), dtype)
    config = TINY.llama_config()
    for (name, weight), (_, again) in zip(first.named_parameters(), second.named_parameters(), strict=True):
        assert weight.dtype == dtype and torch.equal(weight, again), name
        if weight.dim() == 1:
            assert torch.all(weight == 1), f"{name}: a norm weight starts at 1"
        else:
            std = weight.float().std().item()
            assert abs(std - config.initializer_range) < 0.2 * config.initializer_range, name
    tied = first.lm_head.weight.data_ptr() == first.model.embed_tokens.weight.data_ptr()
    assert tied == bool(config.tie_word_embeddings)
    assert sum(p.numel() for p in first.parameters()) == TINY.parameters


@pytest.mark.parametrize(("listed", "expected"), [(True, "bf16"), (False, "fp32")])
def test_qlora_computes_in_bf16_only_where_the_cpu_lists_avx512_bf16(monkeypatch, listed: bool, expected: str):
    monkeypatch.setattr(scale_runs, "cpu_lists_avx512_bf16", lambda: listed)
    assert cpu_compute_dtype() == expected
    assert tiny_spec("qlora").compute_dtype == expected
    assert tiny_spec("qlora", "fp32").compute_dtype == "fp32"  # a request wins


def test_the_other_methods_compute_in_their_own_dtype():
    assert [tiny_spec(m).compute_dtype for m in ("full", "lora-fp32", "lora-bf16")] == ["fp32", "fp32", "bf16"]
    with pytest.raises(UserInputError, match="lora-fp32 computes in fp32"):
        tiny_spec("lora-fp32", "bf16")


@pytest.mark.parametrize(
    ("spec", "steps", "option", "message"),
    [
        (tiny_spec("qlora", device="cuda"), 1, False, "on the CPU"),
        (tiny_spec("qlora"), -1, False, "cannot be negative"),
        (tiny_spec("lora-bf16"), 1, True, "not lora-bf16's"),
    ],
)
def test_what_the_runner_cannot_do_is_refused(spec: RunSpec, steps: int, option: bool, message: str):
    with pytest.raises(UserInputError, match=message):
        check_spec(spec, steps, quantize_while_loading=option)


def test_each_method_trains_what_it_should(checkpoints: Path):
    lora = TINY.lora_parameters(16)
    full, _ = build_for_method(tiny_spec("full"))
    assert all(p.requires_grad and p.dtype == torch.float32 for p in full.parameters())
    for method, dtype in (("lora-fp32", torch.float32), ("lora-bf16", torch.bfloat16)):
        assert base_checkpoint(tiny_spec(method), checkpoints) is None
        model, base = build_for_method(tiny_spec(method))
        trainable = [p for p in model.parameters() if p.requires_grad]
        assert sum(p.numel() for p in trainable) == lora
        assert model.get_base_model().model.layers[0].mlp.up_proj.base_layer.weight.dtype == dtype
        assert base["base_source"] == "random"
    spec = tiny_spec("qlora", "bf16")
    model, base = build_for_method(spec, base_checkpoint(spec, checkpoints))
    up = model.get_base_model().model.layers[0].mlp.up_proj.base_layer
    assert isinstance(up, bnb.nn.Linear4bit) and up.compute_dtype == torch.bfloat16
    assert not up.support_avx512bf16_for_cpu  # guarded against CPU repacking
    assert base["base_source"] == "nf4-dq checkpoint" and base["base_quant_state_bytes"] > 0
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora


def test_qlora_without_a_built_checkpoint_is_refused(tmp_path: Path):
    with pytest.raises(UserInputError, match="holds none"):
        build_for_method(tiny_spec("qlora"), tmp_path)


def test_a_measured_run_records_its_phases_steps_and_parameters(checkpoints: Path):
    results = measure_run(tiny_spec("qlora", "fp32"), 4, checkpoints)
    assert results["shape"] == "tiny-llama" and results["compute_dtype"] == "fp32"
    assert len(results["step_seconds"]) == 4
    assert results["median_step_seconds"] == sorted(results["step_seconds"][1:])[1]  # the first step left out
    assert results["tokens_per_second"] == pytest.approx(16 / results["median_step_seconds"])
    assert results["trainable_parameters"] == TINY.lora_parameters(16)
    assert results["total_parameters"] == TINY.parameters + TINY.lora_parameters(16)
    assert results["peak_bytes"] == max(results["load"]["hwm_bytes"], results["train"]["hwm_bytes"])
    assert results["live_tensor_peak_bytes"] is None


def test_zero_steps_measure_the_load_alone_and_quantizing_while_loading_reads_the_bf16_twin(checkpoints: Path):
    results = measure_run(tiny_spec("qlora", "bf16"), 0, checkpoints, quantize_while_loading=True)
    assert results["train"] is None and results["median_step_seconds"] is None and results["step_seconds"] == []
    assert results["base_source"] == "bf16 checkpoint"
    assert results["peak_bytes"] == results["load"]["hwm_bytes"]


def test_the_live_tensor_peak_is_recorded_on_request(checkpoints: Path):
    results = measure_run(tiny_spec("lora-fp32"), 1, checkpoints, live_tensors=True)
    assert results["live_tensor_peak_bytes"] >= results["base_weight_bytes"]


def test_the_fresh_process_command_names_every_choice():
    spec = tiny_spec("qlora", "bf16", gradient_checkpointing=False, batch_size=2)
    command = measure_command(spec, 4, quantize_while_loading=True, live_tensors=True, margin=0.2)
    assert command[1:4] == ["-m", "qlora_tutorial", "measure"]
    text = " ".join(command[4:])
    assert text == (
        "--shape tiny-llama --method qlora --steps 4 --seq-len 16 --batch-size 2 --lora-r 16 --compute-dtype bf16 "
        "--no-gradient-checkpointing --quantize-while-loading --live-tensors --margin 0.2 --json"
    )
    assert "--margin" not in measure_command(spec, 4)  # the command's own default


def test_a_refusal_in_the_child_is_raised_as_the_same_user_error(monkeypatch: pytest.MonkeyPatch):
    refused = subprocess.CompletedProcess([], 2, stdout="", stderr="a warning\nerror: full needs 27.6 GiB\n")
    monkeypatch.setattr(scale_runs.subprocess, "run", lambda *args, **kwargs: refused)
    with pytest.raises(UserInputError, match=r"^full needs 27\.6 GiB$"):
        measure_in_fresh_process(tiny_spec("full"), 1)
    crashed = subprocess.CompletedProcess([], 1, stdout="", stderr="Traceback\nRuntimeError: boom\n")
    monkeypatch.setattr(scale_runs.subprocess, "run", lambda *args, **kwargs: crashed)
    with pytest.raises(RuntimeError, match="exit 1"):
        measure_in_fresh_process(tiny_spec("full"), 1)


@pytest.mark.slow
def test_a_run_in_a_fresh_process_returns_its_measurements(tmp_path: Path):
    results = measure_in_fresh_process(tiny_spec("lora-bf16"), 2, log_path=tmp_path / "log.txt")
    assert results["method"] == "lora-bf16" and len(results["step_seconds"]) == 2
    assert results["predicted_bytes"] > 0 and results["load"]["hwm_bytes"] > 0
    assert (tmp_path / "log.txt").is_file()
