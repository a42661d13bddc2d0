"""LoRALinear and QLoRALinear match PEFT's LoRA layers; the parameter formula matches PEFT's count."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
from torch import nn

from qlora_tutorial.cpu_packing import PackedWeightsError, keep_standard_layout, repack_for_cpu
from qlora_tutorial.lora import (
    LoRALinear,
    QLoRALinear,
    adapted_linear_layers,
    head_parameter_count,
    lora_parameter_count,
    lora_update_params,
)
from qlora_tutorial.memory import count_parameters
from qlora_tutorial.modeling import attach_lora, load_classifier, reference_lora_config
from qlora_tutorial.settings import Settings


def peft_single_layer(r: int = 4, alpha: int = 8) -> nn.Module:
    """A one-layer model wrapped by PEFT, with B made non-zero so the update is not trivially zero."""
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(12, 6))
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=["proj"]))
    with torch.no_grad():
        peft_model.base_model.model.proj.lora_B["default"].weight.normal_()
    return peft_model


def step(module: nn.Module, x: torch.Tensor, target: torch.Tensor) -> None:
    """One SGD step on a squared error."""
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)
    loss = ((module(x) - target) ** 2).mean()
    loss.backward()
    optimizer.step()


def test_lora_linear_starts_as_the_base_layer() -> None:
    base = nn.Linear(12, 6)
    x = torch.randn(3, 12)
    ours = LoRALinear(base, r=4, alpha=8)
    torch.testing.assert_close(ours(x), base(x))
    assert not base.weight.requires_grad
    assert [name for name, p in ours.named_parameters() if p.requires_grad] == ["lora_A", "lora_B"]


def test_lora_linear_matches_peft_before_and_after_a_step() -> None:
    peft_model = peft_single_layer()
    peft_layer = peft_model.base_model.model.proj
    ours = LoRALinear.from_peft(peft_layer)
    x, target = torch.randn(5, 12), torch.randn(5, 6)
    torch.testing.assert_close(ours(x), peft_model(x))
    assert ours(x).sub(ours.base(x)).abs().max() > 0  # the update is live

    step(peft_model, x, target)
    step(ours, x, target)
    torch.testing.assert_close(ours.lora_A, peft_layer.lora_A["default"].weight)
    torch.testing.assert_close(ours.lora_B, peft_layer.lora_B["default"].weight)
    torch.testing.assert_close(ours(x), peft_model(x))


def peft_4bit_query(settings: Settings) -> PeftLoraLinear4bit:
    """PEFT's LoRA layer on the first 4-bit query of the tiny BERT (NF4, double quantization), B made non-zero."""
    model = attach_lora(load_classifier(settings, "nf4-dq"))
    layer = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, PeftLoraLinear4bit)
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer.eval()  # dropout off, so both layers compute the same thing


def test_qlora_linear_matches_peft_outputs_and_gradients(tiny_settings: Settings) -> None:
    peft_layer = peft_4bit_query(tiny_settings)
    ours = QLoRALinear.from_peft(peft_layer).eval()
    assert ours.base is peft_layer.get_base_layer()  # shared, not copied
    torch.manual_seed(0)
    x, target = torch.randn(3, 5, 64), torch.randn(3, 5, 64)
    x_peft, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_peft, out_ours = peft_layer(x_peft), ours(x_ours)
    torch.testing.assert_close(out_ours, out_peft)
    torch.testing.assert_close(ours.base_forward(x), peft_layer.get_base_layer()(x))
    ((out_peft - target) ** 2).mean().backward()
    ((out_ours - target) ** 2).mean().backward()
    torch.testing.assert_close(ours.lora_A.grad, peft_layer.lora_A["default"].weight.grad)
    torch.testing.assert_close(ours.lora_B.grad, peft_layer.lora_B["default"].weight.grad)
    torch.testing.assert_close(x_ours.grad, x_peft.grad)  # the gradient passes through the frozen base to the input
    assert ours.lora_A.grad.abs().max() > 0  # B is non-zero, so A's gradient is live
    weight = ours.base.weight
    assert weight.dtype == torch.uint8 and not weight.requires_grad and weight.grad is None


def test_qlora_linear_matches_peft_after_a_step(tiny_settings: Settings) -> None:
    peft_layer = peft_4bit_query(tiny_settings)
    ours = QLoRALinear.from_peft(peft_layer).eval()
    torch.manual_seed(1)
    x, target = torch.randn(4, 64), torch.randn(4, 64)
    step(peft_layer, x, target)
    step(ours, x, target)
    torch.testing.assert_close(ours.lora_A, peft_layer.lora_A["default"].weight)
    torch.testing.assert_close(ours.lora_B, peft_layer.lora_B["default"].weight)
    torch.testing.assert_close(ours(x), peft_layer(x))


def test_qlora_linear_follows_the_compute_dtype() -> None:
    """A bf16-compute layer (the GPU setting): the base runs in bf16 like bitsandbytes', A and B stay fp32."""
    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.bfloat16, quant_type="nf4").to("cpu")
    ours = QLoRALinear(keep_standard_layout(layer), r=4, alpha=8)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours.base_forward(x), layer(x))
    assert ours(x).dtype == torch.float32 and ours.lora_A.dtype == ours.lora_B.dtype == torch.float32


def test_qlora_linear_refuses_a_full_precision_layer() -> None:
    with pytest.raises(TypeError, match=r"wraps a bitsandbytes Linear4bit.*got Linear\. Use LoRALinear"):
        QLoRALinear(nn.Linear(8, 8), r=4, alpha=8)
    fp32_layer = peft_single_layer().base_model.model.proj
    with pytest.raises(TypeError, match="Use LoRALinear"):
        QLoRALinear.from_peft(fp32_layer)


def test_qlora_linear_refuses_an_unquantized_layer() -> None:
    with pytest.raises(ValueError, match="quant_state is None"):
        QLoRALinear(bnb.nn.Linear4bit(8, 8), r=4, alpha=8)


def test_qlora_linear_refuses_a_layer_packed_for_cpu() -> None:
    layer = bnb.nn.Linear4bit(64, 32, quant_type="nf4").to("cpu")
    repack_for_cpu(layer)
    with pytest.raises(PackedWeightsError, match="repacked for CPU inference"):
        QLoRALinear(layer, r=4, alpha=8)


@pytest.mark.parametrize("r", [0, -1])
def test_non_positive_rank_is_refused(r: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        LoRALinear(nn.Linear(4, 4), r=r, alpha=8)
    with pytest.raises(ValueError, match="positive integer"):
        lora_update_params(r, 4, 4)


@pytest.mark.parametrize(("fan_in", "fan_out"), [(12, 6), (768, 768), (64, 3072)])
def test_update_params_count_what_a_lora_layer_trains(fan_in: int, fan_out: int) -> None:
    layer = LoRALinear(nn.Linear(fan_in, fan_out), r=8, alpha=16)
    assert lora_update_params(8, fan_in, fan_out) == count_parameters(layer).trainable


@pytest.mark.parametrize("r", [1, 4, 8, 16])
@pytest.mark.parametrize("targets", [("query", "value"), ("query", "key", "value", "dense"), "all-linear"])
def test_parameter_formula_matches_peft(tiny_settings: Settings, r: int, targets: tuple[str, ...] | str) -> None:
    model = load_classifier(tiny_settings, "fp32")
    expected = lora_parameter_count(model, r, targets)
    peft_model = get_peft_model(model, reference_lora_config(r=r, target_modules=targets))
    assert expected == count_parameters(peft_model).trainable
    assert lora_parameter_count(peft_model.base_model.model, r, targets) == expected  # works on the wrapped model too


def test_tiny_bert_head_and_layers(tiny_settings: Settings) -> None:
    model = load_classifier(tiny_settings, "fp32")
    assert head_parameter_count(model) == 64 * 4 + 4
    layers = adapted_linear_layers(model, ("query", "value"))
    assert len(layers) == 4 and set(layers.values()) == {(64, 64)}
    assert "bert.pooler.dense" in adapted_linear_layers(model, "all-linear")
    assert "classifier" not in adapted_linear_layers(model, "all-linear")


def test_config_without_task_type_trains_no_head(tiny_settings: Settings) -> None:
    model = load_classifier(tiny_settings, "fp32")
    expected = lora_parameter_count(model, 8, ("query", "value"), head_modules=())
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=["query", "value"]))
    assert expected == count_parameters(peft_model).trainable == 4 * 8 * (64 + 64)


def test_unknown_target_is_refused(tiny_settings: Settings) -> None:
    model = load_classifier(tiny_settings, "fp32")
    with pytest.raises(ValueError, match="No linear layer"):
        lora_parameter_count(model, 8, ("q_proj",))
