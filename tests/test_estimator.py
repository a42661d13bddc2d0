import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM

from qlora_tutorial import estimator
from qlora_tutorial.cpu_packing import keep_standard_layout
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import (
    GPUS,
    RunSpec,
    RunWouldNotFit,
    block_activation_bytes,
    check_fits,
    estimate_peak,
    get_gpu,
    refuse_if_not_fits,
    weight_parts,
)
from qlora_tutorial.projection import GIB, NF4_DQ_BITS
from qlora_tutorial.shapes import ALL_LINEAR_TARGETS, get_decoder_shape

CALIBRATION = Path(__file__).parent / "data" / "estimator_calibration.json"
TINY = get_decoder_shape("tiny-llama")


def saved_activation_bytes(spec: RunSpec, layers: int, folder: Path) -> int:
    """Bytes autograd saves in one forward pass of ``spec``'s model with ``layers`` blocks, parameters excluded."""
    shape = dataclasses.replace(spec.shape, layers=layers)
    torch.manual_seed(0)
    model = LlamaForCausalLM(shape.llama_config())
    if spec.method == "qlora":
        model.save_pretrained(folder / f"{layers}")
        quantization = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[spec.compute_dtype]),
        )
        model = AutoModelForCausalLM.from_pretrained(folder / f"{layers}", quantization_config=quantization)
        model = prepare_model_for_kbit_training(keep_standard_layout(model), use_gradient_checkpointing=False)
    elif spec.method == "lora-bf16":
        model = model.to(torch.bfloat16)
    if spec.method != "full":
        config = LoraConfig(
            r=spec.lora_r, lora_alpha=2 * spec.lora_r, lora_dropout=0.05, target_modules=list(ALL_LINEAR_TARGETS)
        )
        model = keep_standard_layout(get_peft_model(model, config))
    model.train()
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    ids = torch.randint(shape.vocab, (spec.batch_size, spec.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(input_ids=ids, labels=ids)
    return sum(saved.values())


@pytest.mark.parametrize(
    ("method", "compute"), [("full", "fp32"), ("lora-fp32", "fp32"), ("lora-bf16", "bf16"), ("qlora", "fp32")]
)
def test_saved_activations_per_block_are_what_autograd_saves(method, compute, tmp_path):
    """SAVED_PER_TOKEN against the real count: one more block saves exactly block_activation_bytes more."""
    spec = RunSpec(TINY, method, batch_size=2, seq_len=24, compute_dtype=compute, lora_r=4)
    one_more = saved_activation_bytes(spec, 3, tmp_path) - saved_activation_bytes(spec, 2, tmp_path)
    assert one_more == block_activation_bytes(spec)


def test_qlora_saves_the_same_activations_in_either_compute_dtype():
    """The residual stream is fp32 after prepare_model_for_kbit_training's upcast, whatever the 4-bit layers use."""
    fp32, bf16 = (RunSpec(TINY, "qlora", compute_dtype=dtype) for dtype in ("fp32", "bf16"))
    assert block_activation_bytes(fp32) == block_activation_bytes(bf16)
    assert estimate_peak(fp32).parts["transient"] == 2 * estimate_peak(bf16).parts["transient"]


def test_weights_by_precision():
    shape = get_decoder_shape("llama-2-7b")
    full, lora, lora16, qlora = (weight_parts(RunSpec(shape, m)) for m in ("full", "lora-fp32", "lora-bf16", "qlora"))
    assert full["weights"] == lora["weights"] == 4 * shape.parameters == 2 * lora16["weights"]
    assert full["gradients"] == 4 * shape.parameters and full["optimizer"] == 8 * shape.parameters and not full["lora"]
    four_bit = qlora["weights"] - 4 * shape.other_parameters + qlora["quant_state"]
    assert 8 * four_bit / shape.linear_parameters == pytest.approx(NF4_DQ_BITS, abs=1e-6)
    adapters = shape.lora_parameters(16)
    assert qlora["lora"] == 4 * adapters and qlora["gradients"] == 4 * adapters and qlora["optimizer"] == 8 * adapters


def test_checkpointing_batch_and_sequence_move_the_activations_the_right_way():
    shape = get_decoder_shape("smollm2-360m")
    base = RunSpec(shape, "qlora", seq_len=256)
    on, off = estimate_peak(base), estimate_peak(dataclasses.replace(base, gradient_checkpointing=False))
    assert on.parts["activations"] < off.parts["activations"] / 10
    assert on.parts["weights"] == off.parts["weights"]
    doubled = estimate_peak(dataclasses.replace(base, batch_size=2))
    assert doubled.parts["activations"] == 2 * on.parts["activations"]
    assert doubled.parts["logits"] == 2 * on.parts["logits"]


def test_methods_order_on_a_7b_model_as_issue_23_measured():
    shape = get_decoder_shape("llama-2-7b")
    totals = {method: estimate_peak(RunSpec(shape, method)).total_bytes for method in estimator.METHODS}
    assert totals["qlora"] < totals["lora-bf16"] < totals["lora-fp32"] < totals["full"]


def test_a_gpu_run_counts_the_cuda_context_not_the_python_process():
    shape = get_decoder_shape("mistral-7b")
    cpu, gpu = (estimate_peak(RunSpec(shape, "qlora", compute_dtype="bf16", device=d)) for d in ("cpu", "cuda"))
    assert gpu.parts["runtime"] == estimator.CUDA_CONTEXT_BYTES != cpu.parts["runtime"]


def test_the_cpu_runtime_starts_from_the_process_given_and_nothing_else_moves():
    spec = RunSpec(TINY, "qlora")
    default, measured = estimate_peak(spec), estimate_peak(spec, 700 * estimator.MIB)
    assert default.parts["runtime"] == estimator.RUNTIME_BYTES + estimator.TRAINING_OVERHEAD_BYTES
    assert measured.parts["runtime"] == 700 * estimator.MIB + estimator.TRAINING_OVERHEAD_BYTES
    assert {**measured.parts, "runtime": 0} == {**default.parts, "runtime": 0}


def test_a_gpu_run_ignores_the_cpu_process():
    spec = RunSpec(TINY, "qlora", compute_dtype="bf16", device="cuda")
    assert estimate_peak(spec, 700 * estimator.MIB).parts == estimate_peak(spec).parts


@pytest.mark.parametrize("process_bytes", [0, -1])
def test_a_process_without_a_resident_set_is_refused(process_bytes: int):
    with pytest.raises(UserInputError, match=rf"resident set must be positive, got {process_bytes} bytes"):
        estimate_peak(RunSpec(TINY, "full"), process_bytes)
    with pytest.raises(UserInputError, match="resident set must be positive"):
        refuse_if_not_fits(RunSpec(TINY, "full"), 64 * GIB, process_bytes=process_bytes)


def test_every_recorded_run_is_predicted_within_15_percent():
    recorded = json.loads(CALIBRATION.read_text())
    assert len(recorded["runs"]) >= 20
    errors = {}
    for run in recorded["runs"]:
        spec = RunSpec(
            get_decoder_shape(run["shape"]),
            run["method"],
            batch_size=run["batch_size"],
            seq_len=run["seq_len"],
            gradient_checkpointing=run["gradient_checkpointing"],
            compute_dtype=run["compute_dtype"],
            lora_r=run["lora_r"],
        )
        errors[spec.describe()] = estimate_peak(spec).total_bytes / run["peak_bytes"] - 1
    worst = max(errors, key=lambda name: abs(errors[name]))
    assert abs(errors[worst]) < 0.15, f"{worst}: {errors[worst]:+.1%}"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"method": "dora"}, "Unknown method 'dora'. Known methods: full, lora-fp32, lora-bf16, qlora"),
        ({"device": "tpu"}, "Unknown device 'tpu'"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"seq_len": -5}, "seq_len must be at least 1"),
        ({"lora_r": 0}, "lora_r must be at least 1"),
        ({"method": "lora-fp32", "compute_dtype": "bf16"}, "lora-fp32 computes in fp32, not 'bf16'"),
        ({"compute_dtype": "int4"}, "Known dtypes: fp32, bf16, fp16"),
    ],
)
def test_impossible_runs_are_refused(changes, message):
    with pytest.raises(UserInputError, match=message):
        RunSpec(**{"shape": TINY, "method": "qlora", **changes})


def test_compute_dtype_defaults_to_the_methods_own():
    assert RunSpec(TINY, "lora-bf16").compute_dtype == "bf16"
    assert RunSpec(TINY, "qlora").compute_dtype == RunSpec(TINY, "full").compute_dtype == "fp32"
    assert RunSpec(TINY, "lora-bf16", compute_dtype="fp16").compute_dtype == "fp16"


def test_the_verdict_says_what_is_needed_and_what_there_is():
    estimate = estimate_peak(RunSpec(get_decoder_shape("smollm2-1.7b"), "full"))
    needed = estimate.total_bytes
    tight = check_fits(estimate, round(needed / 0.95), margin=0.10)
    assert not tight.fits
    assert tight.message == (
        f"full fine-tuning of smollm2-1.7b needs {needed / GIB:.1f} GiB, this machine has "
        f"{needed / 0.95 / GIB:.1f} GiB available (margin 10%): predicted only"
    )
    assert check_fits(estimate, round(needed / 0.85), margin=0.10, where="a T4").message.endswith(": fits")
    assert "a T4 has" in check_fits(estimate, needed, margin=0, where="a T4").message
    with pytest.raises(UserInputError, match="margin is a share"):
        check_fits(estimate, needed, margin=1.5)
    with pytest.raises(UserInputError, match="must be positive"):
        check_fits(estimate, 0, margin=0.1)


def test_a_run_that_would_not_fit_is_refused_with_the_numbers(monkeypatch):
    spec = RunSpec(get_decoder_shape("llama-2-7b"), "lora-fp32")
    with pytest.raises(RunWouldNotFit, match=r"LoRA on an fp32 base of llama-2-7b needs .* GiB, this machine has 8\.0"):
        refuse_if_not_fits(spec, 8 * GIB)
    assert issubclass(RunWouldNotFit, UserInputError)
    monkeypatch.setattr(estimator.psutil, "virtual_memory", lambda: SimpleNamespace(available=200 * GIB))
    assert refuse_if_not_fits(spec).total_bytes == estimate_peak(spec).total_bytes


def test_the_refusal_counts_the_process_given_byte_for_byte():
    spec = RunSpec(TINY, "lora-fp32")
    needed = estimate_peak(spec, 500 * estimator.MIB).total_bytes
    fits = refuse_if_not_fits(spec, needed, margin=0, process_bytes=500 * estimator.MIB)
    assert fits.parts["runtime"] == 500 * estimator.MIB + estimator.TRAINING_OVERHEAD_BYTES
    with pytest.raises(RunWouldNotFit, match="LoRA on an fp32 base of tiny-llama needs"):
        refuse_if_not_fits(spec, needed, margin=0, process_bytes=500 * estimator.MIB + 1)


def test_gpus_are_their_usable_memory_and_names_are_forgiving():
    t4 = get_gpu("t4")
    assert t4.usable_gib == pytest.approx(15_095 / 1024, abs=0.005)  # torch: total_memory=15095MB (MiB)
    assert t4.usable_bytes < 15_360 * 2**20 < 16 * GIB  # nvidia-smi's figure, then the label
    assert get_gpu("A100-40GB") is GPUS["A100 40GB"] and get_gpu("a100_80gb") is GPUS["A100 80GB"]
    assert all(gpu.usable_gib < float(gpu.sold_as.split()[0]) for gpu in GPUS.values())
    with pytest.raises(UserInputError, match=r"Unknown GPU 'V100'\. Known GPUs: T4, L4, A10G, RTX 4090, A100 40GB"):
        get_gpu("V100")
