"""Notebook 08's decoder: adapters on every linear layer, label scoring and generation, its run and data."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from transformers import PreTrainedTokenizerBase

from qlora_tutorial.__main__ import build_parser
from qlora_tutorial.chat import prompt_text
from qlora_tutorial.data import LABEL_NAMES, load_splits
from qlora_tutorial.decoder import (
    ALL_LINEAR_TARGETS,
    ATTENTION_TARGETS,
    decoder_lora_config,
    generate_answers,
    load_decoder,
    lora_parameters_by_target,
    score_topics,
    topic_token_ids,
)
from qlora_tutorial.decoder_pipeline import decoder_splits, decoder_train_command, decoder_training_arguments
from qlora_tutorial.decoder_profile import DecoderProfile, decoder_profile
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.inference import copy_dequantized_weights
from qlora_tutorial.memory import count_parameters
from qlora_tutorial.modeling import attach_lora
from qlora_tutorial.settings import Settings, load_settings

HEADLINES = [
    "Cup final tonight",
    "Shares fell sharply as the bank reported lower quarterly profit and cut its outlook for the year",
    "Leaders meet at the United Nations to discuss the border war",
    "New chips",
    "Researchers released new software for faster computer chips on Monday",
]


@pytest.fixture
def decoder_settings(tiny_data_dir: Path) -> Settings:
    return load_settings("smoke", data_dir=tiny_data_dir)


@pytest.fixture
def tiny_profile(decoder_settings: Settings, tiny_llama_dir: Path) -> DecoderProfile:
    """The smoke decoder profile on the tiny Llama."""
    return decoder_profile(decoder_settings, model_name=str(tiny_llama_dir))


@pytest.fixture
def tiny_llama(decoder_settings: Settings, tiny_profile: DecoderProfile) -> torch.nn.Module:
    return load_decoder(decoder_settings, tiny_profile, "fp32")


@pytest.fixture
def topic_prompts(decoder_tokenizer: PreTrainedTokenizerBase) -> list[str]:
    return [prompt_text(decoder_tokenizer, text) for text in HEADLINES]


class FirstLetterTokenizer:
    """A fake tokenizer with one token per letter, so Sports and Sci/Tech both start with the token of S."""

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(letter) for letter in text]}


def test_topic_token_ids_are_the_distinct_first_tokens_of_the_names(decoder_tokenizer):
    ids = topic_token_ids(decoder_tokenizer)
    assert len(set(ids)) == len(LABEL_NAMES)
    assert ids == [decoder_tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in LABEL_NAMES]
    assert decoder_tokenizer.decode(ids[3]) == "Sci", "Sci/Tech is more than one token; its first is scored"


def test_topic_names_that_share_a_first_token_are_refused():
    with pytest.raises(UserInputError, match=r"start with the same token in this tokenizer \(\[87, 83, 66, 83\]\)"):
        topic_token_ids(FirstLetterTokenizer())


def test_scores_are_log_probabilities_of_the_four_topics_in_input_order(tiny_llama, decoder_tokenizer, topic_prompts):
    tiny_llama.train()
    scores = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2)
    assert tiny_llama.training, "the model's mode is restored"
    assert scores.shape == (len(HEADLINES), len(LABEL_NAMES)) and scores.dtype == np.float32
    assert np.all(scores < 0) and np.exp(scores).sum(axis=1).max() < 1
    ids = topic_token_ids(decoder_tokenizer)
    for row, prompt in zip(scores, topic_prompts, strict=True):
        batch = decoder_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = torch.log_softmax(tiny_llama(**batch).logits[0, -1], dim=-1)[ids].numpy()
        np.testing.assert_allclose(row, expected, atol=1e-4)


def test_a_row_scores_the_same_alone_as_in_a_padded_batch(tiny_llama, decoder_tokenizer, topic_prompts):
    """Left padding: each row's last position is its own answer position, whatever its neighbours' lengths."""
    lengths = [len(decoder_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in topic_prompts]
    assert len(set(lengths)) == len(lengths), "every row of the batch is padded differently"
    batched = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=len(topic_prompts))
    alone = np.concatenate([score_topics(tiny_llama, decoder_tokenizer, [prompt]) for prompt in topic_prompts])
    assert np.ptp(alone, axis=0).min() > 0.1, "the rows' scores differ, so a mix-up would show"
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_generation_is_greedy_and_the_same_alone_as_in_a_batch(tiny_llama, decoder_tokenizer, topic_prompts):
    tiny_llama.train()
    asked = topic_prompts[:3]  # three lengths: two of the rows are padded in the batch
    answers = generate_answers(tiny_llama, decoder_tokenizer, asked, max_new_tokens=3)
    assert tiny_llama.training, "the model's mode is restored"
    assert len(answers) == len(asked) and all(answers)
    assert answers == [generate_answers(tiny_llama, decoder_tokenizer, [p], max_new_tokens=3)[0] for p in asked]
    assert all(len(decoder_tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 5 for answer in answers)


@pytest.mark.parametrize("ask", [score_topics, generate_answers])
def test_no_prompts_is_refused(ask, tiny_llama, decoder_tokenizer):
    with pytest.raises(UserInputError, match="No prompts given: pass at least one"):
        ask(tiny_llama, decoder_tokenizer, [])


def test_lora_goes_on_every_linear_layer(tiny_profile):
    config = decoder_lora_config(tiny_profile)
    assert (
        set(config.target_modules)
        == set(ALL_LINEAR_TARGETS)
        == {
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        }
    )
    assert (config.r, config.lora_alpha, config.lora_dropout) == (16, 32, 0.05)
    assert config.task_type == "CAUSAL_LM"
    assert set(decoder_lora_config(tiny_profile, ATTENTION_TARGETS).target_modules) == set(ATTENTION_TARGETS)


def test_lora_parameters_by_target_count_each_kind_of_layer(tiny_llama, tiny_profile):
    model = attach_lora(tiny_llama, decoder_lora_config(tiny_profile))
    r, layers = tiny_profile.lora_r, 2
    # (in, out) of each projection: hidden 32, 4 heads of 8, 2 key-value heads (16 wide), MLP 64
    shapes = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32)}
    shapes |= {"gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    counts = lora_parameters_by_target(model)
    assert counts == {kind: layers * r * (fan_in + fan_out) for kind, (fan_in, fan_out) in shapes.items()}
    assert sum(counts.values()) == count_parameters(model).trainable


def test_copy_dequantized_weights_gives_the_4bit_models_arithmetic(decoder_settings, tiny_profile, decoder_tokenizer):
    quantized = load_decoder(decoder_settings, tiny_profile, "nf4-dq")
    base = load_decoder(decoder_settings, tiny_profile, "fp32")
    original = {name: weight.clone() for name, weight in base.state_dict().items()}
    assert copy_dequantized_weights(quantized, base) is base
    four_bit = {name for name, layer in quantized.named_modules() if isinstance(layer, Linear4bit)}
    assert len(four_bit) == 2 * len(ALL_LINEAR_TARGETS), "every linear layer but lm_head is 4-bit"
    for name in four_bit:
        layer = quantized.get_submodule(name)
        weight = base.get_submodule(name).weight
        assert torch.equal(weight, dequantize_4bit(layer.weight.data, layer.weight.quant_state))
        assert not torch.equal(weight, original[f"{name}.weight"]), "rounded to NF4"
    untouched = [name for name in original if name.removesuffix(".weight") not in four_bit]
    assert all(torch.equal(base.state_dict()[name], original[name]) for name in untouched)
    batch = decoder_tokenizer(HEADLINES[1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, quantized(**batch).logits, atol=1e-3, rtol=1e-3)


def test_decoder_test_rows_are_a_balanced_subset_of_the_classifiers(ag_news_dir):
    settings = load_settings("smoke", data_dir=ag_news_dir)
    profile = decoder_profile(settings)
    splits, classifier = decoder_splits(settings, profile), load_splits(settings)
    for name, rows in (("train", profile.train_rows), ("test", profile.eval_rows)):
        split = splits[name]
        assert len(split) == rows
        assert Counter(split["label"]) == {label: rows // 4 for label in range(4)}
        assert set(zip(split["text"], split["label"], strict=True)) <= set(
            zip(classifier[name]["text"], classifier[name]["label"], strict=True)
        )
    assert decoder_splits(settings, profile)["test"]["text"] == splits["test"]["text"], "seeded"


def test_decoder_training_arguments_carry_the_decoders_budget(decoder_settings, tiny_profile, tmp_path):
    arguments = decoder_training_arguments(decoder_settings, tiny_profile, tmp_path, activation_checkpointing=True)
    assert arguments.max_steps == tiny_profile.steps == 4
    assert arguments.per_device_train_batch_size == tiny_profile.batch_size
    assert arguments.learning_rate == tiny_profile.learning_rate
    assert arguments.warmup_steps == tiny_profile.warmup_steps
    assert arguments.eval_strategy == "no" and arguments.logging_steps == 1
    assert arguments.include_num_input_tokens_seen == "non_padding"
    assert arguments.activation_checkpointing is True
    assert arguments.seed == decoder_settings.profile.seed and arguments.report_to == []


def test_the_train_command_round_trips_through_the_parser(decoder_settings, tiny_profile, tmp_path):
    command = decoder_train_command(decoder_settings, tiny_profile, tmp_path / "run", "fp32", steps=3)
    assert command[1:4] == ["-m", "qlora_tutorial", "train-decoder"]
    arguments = build_parser().parse_args(command[3:])
    assert arguments.profile == "smoke" and arguments.precision == "fp32"
    assert arguments.model == tiny_profile.model_name and arguments.revision is None
    assert arguments.data_dir == str(decoder_settings.data_dir) and arguments.steps == 3
    assert arguments.output_dir == str(tmp_path / "run") and arguments.gradient_checkpointing is False
    pinned = decoder_profile(decoder_settings, model_name="HuggingFaceTB/SmolLM2-360M-Instruct", model_revision="abc")
    again = build_parser().parse_args(
        decoder_train_command(decoder_settings, pinned, "out", gradient_checkpointing=True)[3:]
    )
    assert (again.revision, again.precision, again.steps) == ("abc", "nf4-dq", pinned.steps)
    assert again.gradient_checkpointing is True
