import pytest

from qlora_tutorial.projection import (
    GPU_MEMORY_GB,
    LLAMA_SHAPES,
    METHODS,
    NF4_DQ_BITS,
    PAPER_65B_FULL_16BIT_GB,
    PAPER_65B_QLORA_BOUND_GB,
    ModelShape,
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


def test_full_finetuning_costs_16_bytes_per_parameter():
    assert training_bytes(METHODS[0], 900, 100, 0) == 16_000


def test_lora_parameters_follow_rank_times_fan_in_plus_fan_out():
    shape = ModelShape("toy", hidden=8, layers=2, intermediate=16, vocab=10)
    # per layer: q, k, v, o are 8x8 -> 4 * r * 16; gate, up, down are 8x16 -> 3 * r * 24
    assert shape.lora_parameters(rank=2) == 2 * (4 * 2 * 16 + 3 * 2 * 24)


def test_smallest_gpu_column_lists_a100_80gb_for_65b():
    table = projection_table(project_all())
    assert table.splitlines()[-1].startswith("| 65B |")
    assert table.splitlines()[-1].endswith("| A100 80GB |")


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
