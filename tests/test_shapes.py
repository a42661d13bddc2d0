import dataclasses

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from qlora_tutorial import projection
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.shapes import ALL_LINEAR_TARGETS, ATTENTION_TARGETS, DECODER_SHAPES, DecoderShape, get_decoder_shape

PUBLISHED = [shape for shape in DECODER_SHAPES.values() if shape.published_parameters is not None]
BUILDABLE = [shape for shape in DECODER_SHAPES.values() if not shape.attention_bias]


@pytest.mark.parametrize("shape", PUBLISHED, ids=lambda shape: shape.name)
def test_each_published_shape_has_its_published_parameter_count(shape: DecoderShape):
    assert shape.parameters == shape.published_parameters
    assert shape.hub_id


def test_the_shapes_the_issue_lists_match_its_table():
    # hidden, MLP, layers, heads / KV heads, vocab, tied (issue 23)
    rows = {
        "smollm2-360m": (960, 2560, 32, 15, 5, 49_152, True),
        "smollm2-1.7b": (2048, 8192, 24, 32, 32, 49_152, True),
        "llama-2-7b": (4096, 11_008, 32, 32, 32, 32_000, False),
    }
    for name, row in rows.items():
        shape = DECODER_SHAPES[name]
        got = (shape.hidden, shape.intermediate, shape.layers, shape.heads, shape.kv_heads, shape.vocab)
        assert (*got, shape.tied_embeddings) == row


@pytest.mark.parametrize("shape", BUILDABLE, ids=lambda shape: shape.name)
def test_llama_config_builds_a_model_with_exactly_the_shapes_parameters(shape: DecoderShape):
    with torch.device("meta"):
        model = LlamaForCausalLM(shape.llama_config())
    assert sum(parameter.numel() for parameter in model.parameters()) == shape.parameters
    attention = model.model.layers[0].self_attn
    assert attention.k_proj.out_features == shape.kv_hidden
    assert model.model.layers[0].mlp.down_proj.weight.numel() <= shape.largest_linear


def test_grouped_query_attention_narrows_k_and_v_only():
    shape = get_decoder_shape("llama-3-8b")
    assert shape.head_dim == 128 and shape.kv_hidden == 1024
    assert shape.linear_shapes["k_proj"] == (4096, 1024) and shape.linear_shapes["q_proj"] == (4096, 4096)
    plain = dataclasses.replace(shape, kv_heads=0)  # as many k/v heads as heads
    assert plain.parameters - shape.parameters == shape.layers * 2 * 4096 * (4096 - 1024)


def test_qwen_counts_its_q_k_v_biases_and_cannot_be_built_as_llama():
    shape = get_decoder_shape("qwen2.5-7b")
    without = dataclasses.replace(shape, attention_bias=False)
    assert shape.parameters - without.parameters == 28 * (3584 + 2 * 512)
    with pytest.raises(UserInputError, match="o_proj too"):
        shape.llama_config()


@pytest.mark.parametrize("targets", [ALL_LINEAR_TARGETS, ATTENTION_TARGETS, ("q_proj", "v_proj")])
def test_lora_parameters_match_peft_on_a_tiny_model(targets):
    shape = get_decoder_shape("tiny-llama")  # grouped-query: k and v narrower than q
    model = LlamaForCausalLM(shape.llama_config())
    config = LoraConfig(r=4, lora_alpha=8, target_modules=list(targets), task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert shape.lora_parameters(4, targets) == trainable


def test_names_are_case_insensitive_and_unknown_ones_list_the_known():
    assert get_decoder_shape(" SmolLM2-1.7B ") is DECODER_SHAPES["smollm2-1.7b"]
    with pytest.raises(UserInputError, match=r"Unknown shape 'llama-9b'\. Known shapes: tiny-llama, .*qwen2\.5-7b"):
        get_decoder_shape("llama-9b")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"hidden": 0}, "hidden must be positive"),
        ({"vocab": -1}, "vocab must be positive"),
        ({"heads": 7}, "not divisible by 7 heads"),
        ({"heads": 4, "kv_heads": 3}, "must divide the 4 attention heads"),
        ({"heads": 0, "kv_heads": 2}, "must divide the 0 attention heads"),
        ({"heads": -2}, "cannot be negative"),
    ],
)
def test_impossible_shapes_are_refused(changes, message):
    with pytest.raises(UserInputError, match=message):
        dataclasses.replace(DECODER_SHAPES["tiny-llama"], **changes)


def test_a_shape_without_heads_has_parameters_but_no_head_width():
    shape = DecoderShape("3B", hidden=3200, layers=26, intermediate=8640)  # notebook 06's exercise
    assert shape.kv_hidden == shape.hidden and shape.parameters > 0
    with pytest.raises(UserInputError, match="give heads="):
        _ = shape.head_dim
    with pytest.raises(UserInputError, match="give heads="):
        shape.llama_config()


def test_lora_rank_and_targets_are_checked():
    shape = DECODER_SHAPES["tiny-llama"]
    with pytest.raises(UserInputError, match="rank must be positive"):
        shape.lora_parameters(0)
    with pytest.raises(UserInputError, match=r"Unknown LoRA targets \['lm_head'\]"):
        shape.lora_parameters(8, ("q_proj", "lm_head"))
    with pytest.raises(UserInputError, match="Unknown LoRA targets"):
        shape.lora_parameters(8, ())


def test_projection_uses_the_same_shape_type():
    assert projection.ModelShape is DecoderShape
    assert projection.get_shape("7B").parameters == get_decoder_shape("llama-2-7b").parameters
    assert projection.LLAMA2_70B.kv_hidden == 1024  # 8 key/value heads of 128
