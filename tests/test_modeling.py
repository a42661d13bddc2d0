import bitsandbytes as bnb
import pytest
import torch

from qlora_tutorial.modeling import (
    Precision,
    attach_lora,
    check_head_not_quantized,
    is_quantized_model,
    load_classifier,
    parse_precision,
    quantization_config,
    storage_dtype,
)


def test_bad_precision_lists_valid_names():
    with pytest.raises(ValueError, match=r"Unknown precision 'int4'\. Valid precisions: fp32, bf16, fp16, int8, fp4"):
        parse_precision("int4")


@pytest.mark.parametrize(
    ("precision", "quant_type", "double"),
    [(Precision.FP4, "fp4", False), (Precision.NF4, "nf4", False), (Precision.NF4_DQ, "nf4", True)],
)
def test_four_bit_configs(precision, quant_type, double):
    config = quantization_config(precision, torch.float32)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == quant_type
    assert config.bnb_4bit_use_double_quant is double
    assert config.llm_int8_skip_modules == ["classifier"]


def test_full_precision_has_no_quantization_config():
    assert quantization_config(Precision.FP32, torch.float32) is None
    assert quantization_config(Precision.INT8, torch.float32).load_in_8bit


def test_storage_dtypes():
    assert storage_dtype(Precision.BF16, torch.float32) == torch.bfloat16
    assert storage_dtype(Precision.NF4, torch.float16) == torch.float16
    assert storage_dtype(Precision.FP32, torch.bfloat16) == torch.float32


def test_nf4_model_quantizes_the_encoder_but_not_the_head(tiny_settings):
    model = load_classifier(tiny_settings, "nf4-dq")
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, bnb.nn.Linear4bit)
    assert type(model.classifier) is torch.nn.Linear
    assert model.config.id2label[3] == "Sci/Tech" and is_quantized_model(model)


def test_head_trap_is_caught_with_the_fix_in_the_message(tiny_settings):
    model = load_classifier(tiny_settings, "nf4", skip_modules=None)
    assert isinstance(model.classifier, bnb.nn.Linear4bit)
    with pytest.raises(ValueError, match=r"llm_int8_skip_modules=\['classifier'\]"):
        check_head_not_quantized(model)


def test_heads_are_seeded_the_same_at_every_precision(tiny_settings):
    full = load_classifier(tiny_settings, "fp32")
    quantized = load_classifier(tiny_settings, "nf4")
    assert torch.equal(full.classifier.weight, quantized.classifier.weight)
    assert not is_quantized_model(full)


def test_reference_lora_trains_adapters_and_head_only(tiny_settings):
    model = attach_lora(load_classifier(tiny_settings, "nf4-dq"))
    trainable = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name or "classifier" in name for name in trainable)
    assert any("query.lora_A" in name for name in trainable) and any("value.lora_B" in name for name in trainable)
    assert not any("key" in name for name in trainable)
    adapters = sum(count for name, count in trainable.items() if "lora_" in name)
    head = sum(count for name, count in trainable.items() if "classifier" in name)
    layers, hidden, rank = 2, 64, 8  # the tiny BERT of conftest.py, under the series' rank
    assert adapters == layers * 2 * rank * (hidden + hidden), "rank-8 A and B on query and value of every layer"
    assert head == hidden * 4 + 4, "the new head trains in full"
