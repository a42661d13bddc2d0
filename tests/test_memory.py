"""Weight memory by precision on the tiny BERT, computed from the shapes."""

from __future__ import annotations

import math

import pytest
from torch import nn

from qlora_tutorial.memory import (
    count_parameters,
    format_bytes,
    peak_is_own,
    weight_memory,
)
from qlora_tutorial.modeling import HEAD_MODULES, load_classifier
from qlora_tutorial.settings import Settings


def quantizable_sizes(model: nn.Module) -> list[int]:
    """Element counts of the weights bitsandbytes quantizes: every linear layer but the head."""
    return [
        module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.split(".")[-1] not in HEAD_MODULES
    ]


@pytest.fixture
def fp32_model(tiny_settings: Settings) -> nn.Module:
    return load_classifier(tiny_settings, "fp32")


def test_fp32_bytes_are_four_per_parameter(tiny_settings: Settings, fp32_model: nn.Module) -> None:
    memory = weight_memory(fp32_model)
    total = sum(p.numel() for p in fp32_model.parameters())
    assert memory.total_bytes == memory.other_bytes == 4 * total
    assert memory.quantized_params == 0 and memory.quantized_bits_per_param == 0.0


def test_nf4_bytes_from_the_shapes(tiny_settings: Settings, fp32_model: nn.Module) -> None:
    sizes = quantizable_sizes(fp32_model)
    other = sum(p.numel() for p in fp32_model.parameters()) - sum(sizes)
    memory = weight_memory(load_classifier(tiny_settings, "nf4"))
    assert memory.quantized_params == sum(sizes)
    assert memory.quantized_bytes == sum(n // 2 for n in sizes)
    assert memory.quant_state_bytes == sum(n // 64 * 4 + 16 * 4 for n in sizes)
    assert memory.other_bytes == 4 * other  # fp32 compute dtype on the CPU
    assert memory.quantized_bits_per_param == pytest.approx(4.5, abs=0.1)


def test_nf4_double_quant_bytes_from_the_shapes(tiny_settings: Settings, fp32_model: nn.Module) -> None:
    sizes = quantizable_sizes(fp32_model)
    memory = weight_memory(load_classifier(tiny_settings, "nf4-dq"))
    # uint8 absmax, the NF4 code book, then the second level: fp32 absmax per 256 blocks, its code, the offset
    nested = sum(n // 64 + 16 * 4 + math.ceil(n / 64 / 256) * 4 + 256 * 4 + 4 for n in sizes)
    assert memory.quantized_bytes == sum(n // 2 for n in sizes)
    assert memory.quant_state_bytes == nested


def test_total_bytes_by_precision(tiny_settings: Settings) -> None:
    totals = {p: weight_memory(load_classifier(tiny_settings, p)).total_bytes for p in ("fp32", "fp16", "int8", "nf4")}
    totals["nf4-dq"] = weight_memory(load_classifier(tiny_settings, "nf4-dq")).total_bytes
    assert totals["fp32"] > totals["int8"] > totals["nf4"]
    assert totals["fp32"] == 2 * totals["fp16"]
    # On the CPU the unquantized weights of int8/4-bit models stay fp32, so an
    # embedding-heavy model is smaller in fp16 than in int8.
    assert totals["fp16"] < totals["int8"]
    # The tiny BERT's 64x64 layers are too small for double quantization to pay:
    # its fixed 256-entry code book (1 KiB per layer) outweighs the absmax it saves.
    assert totals["nf4-dq"] > totals["nf4"]


def test_count_parameters_counts_4bit_weights_at_logical_size(tiny_settings: Settings, fp32_model: nn.Module) -> None:
    quantized = load_classifier(tiny_settings, "nf4-dq")
    stored = sum(p.numel() for p in quantized.parameters())
    counted = count_parameters(quantized)
    assert counted.total == count_parameters(fp32_model).total > stored
    assert counted.trainable == sum(p.numel() for p in quantized.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    ("count", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3 * 1024**3, "3.0 GiB"),
    ],
)
def test_format_bytes(count: int, text: str) -> None:
    assert format_bytes(count) == text


def test_a_peak_is_a_runs_own_only_in_a_process_that_was_never_larger() -> None:
    mib = 2**20
    assert peak_is_own(baseline_bytes=650 * mib, peak_at_start_bytes=660 * mib)
    assert not peak_is_own(baseline_bytes=1_850 * mib, peak_at_start_bytes=2_300 * mib)
