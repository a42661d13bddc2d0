"""Notebook 08's chat formatting: AG News rows as chat turns, and labels that count the answer only."""

from __future__ import annotations

import pytest
from conftest import tiny_texts
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_tutorial.chat import (
    IGNORED_LABEL,
    QUESTION,
    SYSTEM_PROMPT,
    instruction_collator,
    instruction_example,
    prompt_text,
    prompts,
    tokenize_instructions,
    topic_messages,
    truncate_text,
)
from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.sources import packaged_minilm_dir

TEXT = "Shares fell as the bank reported lower quarterly profit"


def ids_of(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_topic_messages_are_system_question_and_the_answer_if_given():
    question = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{QUESTION}\n\n{TEXT}"},
    ]
    assert topic_messages(TEXT) == question
    assert topic_messages(TEXT, "Business") == [*question, {"role": "assistant", "content": "Business"}]


def test_the_prompt_ends_where_the_assistant_answers(decoder_tokenizer):
    text = prompt_text(decoder_tokenizer, TEXT)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{QUESTION}")
    assert text.endswith(f"\n\n{TEXT}<|im_end|>\n<|im_start|>assistant\n")


def test_a_tokenizer_without_a_chat_template_is_refused():
    minilm = AutoTokenizer.from_pretrained(packaged_minilm_dir())  # an encoder's tokenizer: no chat template
    with pytest.raises(UserInputError, match="no chat template, so it is not an instruction-tuned"):
        prompt_text(minilm, TEXT)


def test_truncate_text_keeps_the_first_tokens(decoder_tokenizer):
    assert truncate_text(decoder_tokenizer, TEXT, 100) == TEXT
    cut = truncate_text(decoder_tokenizer, TEXT, 4)
    assert ids_of(decoder_tokenizer, cut) == ids_of(decoder_tokenizer, TEXT)[:4]
    assert TEXT.startswith(cut) and len(cut) < len(TEXT)


def test_only_the_answer_and_the_end_of_turn_are_labelled(decoder_tokenizer):
    example = instruction_example(decoder_tokenizer, TEXT, 2)
    prompt_ids = ids_of(decoder_tokenizer, prompt_text(decoder_tokenizer, TEXT))
    answer_ids = [*ids_of(decoder_tokenizer, "Business"), decoder_tokenizer.eos_token_id]
    assert decoder_tokenizer.eos_token == "<|im_end|>", "SmolLM2's end of turn"
    assert example["input_ids"] == prompt_ids + answer_ids
    assert example["labels"] == [IGNORED_LABEL] * len(prompt_ids) + answer_ids
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_the_example_is_the_chat_templates_conversation_without_its_trailing_newline(decoder_tokenizer):
    """Prompt + answer tokens are what the template writes for the whole chat, up to the newline after the turn."""
    for label, name in enumerate(LABEL_NAMES):
        conversation = decoder_tokenizer.apply_chat_template(topic_messages(TEXT, name), tokenize=False)
        assert conversation.endswith(f"{name}<|im_end|>\n")
        ids = instruction_example(decoder_tokenizer, TEXT, label)["input_ids"]
        assert ids + ids_of(decoder_tokenizer, "\n") == ids_of(decoder_tokenizer, conversation)


@pytest.mark.parametrize("label", [-1, 4])
def test_a_label_outside_the_four_topics_is_refused(decoder_tokenizer, label):
    with pytest.raises(
        UserInputError, match=f"Label {label} is outside 0 to 3 \\(World, Sports, Business, Sci/Tech\\)"
    ):
        instruction_example(decoder_tokenizer, TEXT, label)


def test_tokenize_instructions_formats_every_row_with_cut_texts(decoder_tokenizer):
    frame = tiny_texts(8)
    tokenized = tokenize_instructions(Dataset.from_pandas(frame), decoder_tokenizer, max_text_tokens=5)
    assert tokenized.column_names == ["input_ids", "attention_mask", "labels"]
    assert len(tokenized) == 8
    for row, (text, label) in zip(tokenized, zip(frame["text"], frame["label"], strict=True), strict=True):
        assert row == instruction_example(decoder_tokenizer, truncate_text(decoder_tokenizer, text, 5), label)
    assert prompts(decoder_tokenizer, frame["text"][:2], 5) == [
        prompt_text(decoder_tokenizer, truncate_text(decoder_tokenizer, text, 5)) for text in frame["text"][:2]
    ]


def test_the_collator_pads_labels_with_minus_100(decoder_tokenizer):
    short = instruction_example(decoder_tokenizer, "Cup final", 1)
    long = instruction_example(decoder_tokenizer, TEXT, 2)
    batch = instruction_collator(decoder_tokenizer)([short, long])
    width, padding = len(long["input_ids"]), len(long["input_ids"]) - len(short["input_ids"])
    assert padding > 0
    assert batch["input_ids"].shape == batch["labels"].shape == (2, width)
    assert batch["labels"][0].tolist() == short["labels"] + [IGNORED_LABEL] * padding
    assert batch["input_ids"][0].tolist() == short["input_ids"] + [decoder_tokenizer.pad_token_id] * padding
    assert batch["attention_mask"][0].tolist() == [1] * len(short["input_ids"]) + [0] * padding
    assert batch["labels"][1].tolist() == long["labels"]
