"""LoRALinear matches PEFT's LoRA layer; the parameter formula matches PEFT's count."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from qlora_tutorial.lora import (
    LoRALinear,
    adapted_linear_layers,
    head_parameter_count,
    lora_parameter_count,
    lora_update_params,
)
from qlora_tutorial.memory import count_parameters
from qlora_tutorial.modeling import load_classifier, reference_lora_config
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


@pytest.mark.parametrize("r", [0, -1])
def test_non_positive_rank_is_refused(r: int) -> None:
    with pytest.raises(ValueError, match="positive integer"):
        LoRALinear(nn.Linear(4, 4), r=r, alpha=8)
    with pytest.raises(ValueError, match="positive integer"):
        lora_update_params(r, 4, 4)


def test_update_params_formula() -> None:
    assert lora_update_params(8, 768, 768) == 12_288


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
