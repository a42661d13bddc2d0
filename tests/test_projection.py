import pytest

from qlora_tutorial.projection import (
    ASSUMPTION_VARIANTS,
    GB,
    GPU_MEMORY_GB,
    LLAMA_SHAPES,
    METHODS,
    NF4_DQ_BITS,
    PAPER_65B_FULL_16BIT_GB,
    PAPER_65B_QLORA_BOUND_GB,
    ModelShape,
    assumption_table,
    get_shape,
    project,
    project_all,
    projection_table,
    training_bytes,
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
    assert table.splitlines()[-1].endswith("| RTX A6000 48GB |")


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
    with pytest.raises(ValueError, match="Known GPUs: " + ", ".join(GPU_MEMORY_GB)):
        project("7B", METHODS[2]).fits("V100")
    with pytest.raises(ValueError, match="rank must be positive"):
        project("7B", METHODS[2], rank=0)
