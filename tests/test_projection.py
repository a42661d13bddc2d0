import bitsandbytes as bnb
import pytest
import torch

from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import GPUS
from qlora_tutorial.memory import quant_state_bytes as measured_quant_state_bytes
from qlora_tutorial.memory import tensor_bytes
from qlora_tutorial.projection import (
    ASSUMPTION_VARIANTS,
    GB,
    GIB,
    LLAMA2_70B,
    LLAMA_SHAPES,
    METHODS,
    NF4_CODE_BITS,
    NF4_DQ_BITS,
    PAPER_65B_FULL_16BIT_GB,
    PAPER_65B_GPU,
    PAPER_65B_QLORA_BOUND_GB,
    PROJECTION_GPUS,
    QUANT_STATE_BITS,
    SCALE_OUT_GPUS,
    SCALE_OUT_RANKS,
    ModelShape,
    assumption_table,
    get_shape,
    offloaded_bytes,
    per_rank_bytes,
    project,
    project_all,
    projection_table,
    quant_state_bytes,
    training_bytes,
    usable_gib,
)


def test_nf4_double_quantization_costs_4_127_bits():
    assert abs(NF4_DQ_BITS - 4.127) < 5e-4


def test_llama_7b_shape_has_its_published_parameter_count():
    assert get_shape("7B").parameters == 6_738_415_616


def test_65b_qlora_fits_the_papers_48_gb_and_full_16bit_needs_over_780_gb():
    assert project("65B", METHODS[2]).gb < PAPER_65B_QLORA_BOUND_GB
    assert project("65B", METHODS[0]).gb > PAPER_65B_FULL_16BIT_GB


def test_methods_order_full_over_lora_over_qlora_for_every_size():
    for shape in LLAMA_SHAPES.values():
        full, lora, qlora = (project(shape, method).bytes for method in METHODS)
        assert full > lora > qlora


def test_memory_grows_linearly_in_parameters():
    for method in METHODS:
        once = training_bytes(method, 1_000_000, 50_000, 8_000)
        assert training_bytes(method, 3_000_000, 150_000, 24_000) == pytest.approx(3 * once)


def test_only_qlora_cares_which_weights_sit_in_the_linear_layers():
    """QLoRA quantizes the blocks' linear weights only; full fine-tuning and LoRA treat every weight alike."""
    full, lora, qlora = METHODS
    assert training_bytes(full, 900, 100, 0) == training_bytes(full, 100, 900, 0)
    assert training_bytes(lora, 900, 100, 10) == training_bytes(lora, 100, 900, 10)
    assert training_bytes(qlora, 900, 100, 10) < training_bytes(qlora, 100, 900, 10)


def test_full_finetuning_has_no_adapters_to_pay_for():
    assert training_bytes(METHODS[0], 900, 100, 0) == training_bytes(METHODS[0], 900, 100, 50)
    with pytest.raises(ValueError, match="lora must be a positive number"):
        training_bytes(METHODS[1], 900, 100, 0)


def test_lora_parameters_follow_rank_times_fan_in_plus_fan_out():
    shape = ModelShape("toy", hidden=8, layers=2, intermediate=16, vocab=10)
    # per layer: q, k, v, o are 8x8 -> 4 * r * 16; gate, up, down are 8x16 -> 3 * r * 24
    assert shape.lora_parameters(rank=2) == 2 * (4 * 2 * 16 + 3 * 2 * 24)


def test_smallest_gpu_column_lists_the_papers_48_gb_gpu_for_65b():
    table = projection_table(project_all())
    assert table.splitlines()[-1].startswith("| 65B |")
    assert table.splitlines()[-1].endswith(f"| {PAPER_65B_GPU} |")


def test_each_paper_claim_holds_under_its_own_byte_assumption_and_not_under_the_others():
    shape = get_shape("65B")
    counts = (shape.linear_parameters, shape.other_parameters, shape.lora_parameters())
    full_12, full_16, qlora_paper, qlora_fp32_lora, qlora_series = (
        variant.bytes_for(*counts) / GB for variant in ASSUMPTION_VARIANTS
    )
    assert full_12 == pytest.approx(783.4, abs=0.05) and full_16 > full_12 > PAPER_65B_FULL_16BIT_GB
    assert qlora_paper == pytest.approx(44.1, abs=0.05) and qlora_paper < PAPER_65B_QLORA_BOUND_GB
    assert qlora_fp32_lora < PAPER_65B_QLORA_BOUND_GB < qlora_series  # this series' fp32 upcast would not fit


def test_assumption_table_gives_gb_and_gib_for_every_variant():
    lines = assumption_table("65B").splitlines()
    assert len(lines) == 2 + len(ASSUMPTION_VARIANTS)
    assert lines[0].endswith("| GB | GiB |") and "| 783.4 | 729.6 |" in lines[2]


def test_an_assumption_must_match_its_method():
    with pytest.raises(ValueError, match="is for QLoRA"):
        training_bytes(METHODS[0], 10, 10, 10, ASSUMPTION_VARIANTS[-1])


def test_unknown_model_size_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown model size '70B'.*1\.3B, 7B, 13B, 33B, 65B"):
        get_shape("70B")


@pytest.mark.parametrize("count", [0, -5])
def test_non_positive_parameter_count_is_refused(count):
    with pytest.raises(ValueError, match="must be a positive number of parameters"):
        training_bytes(METHODS[2], count, 10, 10)


def test_unknown_method_and_gpu_and_rank_are_refused():
    with pytest.raises(ValueError, match="Unknown method 'DoRA'"):
        training_bytes("DoRA", 10, 10, 10)
    with pytest.raises(UserInputError, match="Known GPUs: " + ", ".join(GPUS)):
        project("7B", METHODS[2]).fits("V100")
    with pytest.raises(ValueError, match="rank must be positive"):
        project("7B", METHODS[2], rank=0)


# Need and capacity are both in GiB, and the capacity is what a program can allocate (estimator.GPUS). Each verdict
# below flips when need in decimal GB is set against that capacity.
@pytest.mark.parametrize(
    ("model", "method", "gpu"),
    [
        (get_shape("7B"), METHODS[0], "A100 80GB"),  # 80.9 GB = 75.3 GiB, of 79.15 GiB
        (ModelShape("3B", hidden=3200, layers=26, intermediate=8640), METHODS[0], "A100 40GB"),  # 38.3 of 39.38 GiB
    ],
)
def test_gpu_capacities_are_compared_in_gib(model, method, gpu):
    projection = project(model, method)
    assert projection.gb > usable_gib(gpu) > projection.gib
    assert projection.gib == projection.bytes / GIB
    assert projection.fits(gpu)


def test_fits_compares_with_the_usable_memory_not_the_size_a_card_is_sold_as():
    """1.3B full fine-tuning needs 15.04 GiB: under the 16 GB a T4 is sold as, over the 14.74 GiB CUDA gives."""
    projection = project("1.3B", METHODS[0])
    assert GPUS["T4"].usable_gib < projection.gib < float(GPUS["T4"].sold_as.split()[0])
    assert not projection.fits("T4")
    assert usable_gib("a100-80gb") == GPUS["A100 80GB"].usable_gib
    assert all(gpu in GPUS for gpu in (*PROJECTION_GPUS, *SCALE_OUT_GPUS, PAPER_65B_GPU))


def test_65b_with_this_series_fp32_upcast_still_fits_the_papers_48_gb_gpu():
    shape = get_shape("65B")
    series = ASSUMPTION_VARIANTS[-1].bytes_for(shape.linear_parameters, shape.other_parameters, shape.lora_parameters())
    assert series / GB == pytest.approx(48.3, abs=0.05) and series / GIB == pytest.approx(45.0, abs=0.05)
    assert series / GB > PAPER_65B_QLORA_BOUND_GB  # over the paper's figure
    assert series / GIB < usable_gib(PAPER_65B_GPU)  # under what a 48 GB RTX A6000 lets a program allocate


def test_projection_table_is_in_gib():
    header, _, *rows = projection_table(project_all()).splitlines()
    assert "(GiB)" in header and "(GB)" not in header
    assert rows[1].startswith("| 7B | 6.74B | 75.3 |")


def test_quant_state_bits_are_what_bitsandbytes_stores_beside_the_codes():
    """Double quantization: an 8-bit absmax per 64 weights, an fp32 one per 256 of those, two code books."""
    layer = bnb.nn.Linear4bit(1024, 256, quant_type="nf4", compress_statistics=True).to("cpu")
    state, weights = layer.weight.quant_state, 1024 * 256
    code_books = (
        tensor_bytes(state.code) + tensor_bytes(state.state2.code) + tensor_bytes(torch.as_tensor(state.offset))
    )
    assert measured_quant_state_bytes(state) - code_books == QUANT_STATE_BITS / 8 * weights
    assert tensor_bytes(layer.weight) == NF4_CODE_BITS / 8 * weights
    # the state is no parameter and no buffer: what FSDP shards and DDP broadcasts does not include it
    held = [*layer.parameters(), *layer.buffers()]
    assert not any(tensor is state.absmax or tensor is state.state2.absmax for tensor in held)


def test_fsdp_shards_everything_but_the_quantization_state():
    qlora = METHODS[2]
    state = quant_state_bytes(LLAMA2_70B, qlora)
    assert state / GB == pytest.approx(1.09, abs=0.005)
    assert quant_state_bytes(LLAMA2_70B, METHODS[0]) == quant_state_bytes(LLAMA2_70B, METHODS[1]) == 0
    gib = {n: per_rank_bytes(LLAMA2_70B, qlora, n, "FSDP") / GIB for n in SCALE_OUT_RANKS}
    assert gib[2] == pytest.approx(23.88, abs=0.005)  # 25.64 GB, over a 4090's 23.68 GiB; 25.13 GB sans state
    assert gib[4] == pytest.approx(13.35, abs=0.005) and gib[8] == pytest.approx(8.09, abs=0.005)
    # every extra rank holds the whole state again, on top of its share
    sharded_alone = {n: gib[n] - state / GIB * (1 - 1 / n) for n in (2, 4, 8)}
    assert sharded_alone[2] - sharded_alone[4] == pytest.approx(2 * (sharded_alone[4] - sharded_alone[8]))


def test_fsdp_offload_leaves_the_gpu_the_gathered_units_and_the_quantization_state():
    qlora = METHODS[2]
    on_gpu = {per_rank_bytes(LLAMA2_70B, qlora, n, "FSDP offload") for n in SCALE_OUT_RANKS}
    assert len(on_gpu) == 1  # the GPU's part does not shrink with more GPUs: the share is in CPU RAM
    gpu = on_gpu.pop()
    assert gpu / GIB == pytest.approx(2.83, abs=0.005)
    assert gpu < per_rank_bytes(LLAMA2_70B, qlora, 8, "FSDP")
    total = project(LLAMA2_70B, qlora).bytes
    for n in SCALE_OUT_RANKS:  # CPU RAM of all ranks, plus the state on the GPUs once, is the whole bill
        assert n * offloaded_bytes(LLAMA2_70B, qlora, n) + quant_state_bytes(LLAMA2_70B, qlora) == pytest.approx(total)


def test_scale_out_errors_say_what_is_known():
    with pytest.raises(UserInputError, match="Known strategies: DDP, FSDP, FSDP offload"):
        per_rank_bytes(LLAMA2_70B, METHODS[2], 2, "ZeRO")
    with pytest.raises(UserInputError, match="at least 1"):
        offloaded_bytes(LLAMA2_70B, METHODS[2], 0)
    with pytest.raises(UserInputError, match="Unknown method"):
        per_rank_bytes(LLAMA2_70B, "DoRA", 2, "FSDP")
