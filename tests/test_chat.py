"""Notebook 08's chat formatting: AG News rows as chat turns, and labels that count the answer only."""

from __future__ import annotations

import pytest
from conftest import tiny_texts
from datasets import Dataset
from tiny_tokenizers import (
    LLAMA3_TEMPLATE,
    byte_level_tokenizer,
    chatml_tokenizer_without_spare_tokens,
    llama3_style_tokenizer,
)
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from qlora_tutorial.chat import (
    IGNORED_LABEL,
    QUESTION,
    SYSTEM_PROMPT,
    completion_ids,
    end_of_turn_ids,
    ensure_pad_token,
    instruction_collator,
    instruction_example,
    prompt_text,
    prompts,
    split_answer,
    tokenize_instructions,
    topic_answer_ids,
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
    answer_ids = ids_of(decoder_tokenizer, "Business<|im_end|>\n")  # ChatML ends the turn, then a newline
    assert example["input_ids"] == prompt_ids + answer_ids
    assert example["labels"] == [IGNORED_LABEL] * len(prompt_ids) + answer_ids
    assert example["attention_mask"] == [1] * len(example["input_ids"])


def test_the_example_is_the_chat_templates_conversation(decoder_tokenizer):
    """Prompt + answer tokens are exactly what the template writes for the whole chat."""
    for label, name in enumerate(LABEL_NAMES):
        conversation = decoder_tokenizer.apply_chat_template(topic_messages(TEXT, name), tokenize=False)
        assert conversation.endswith(f"{name}<|im_end|>\n")
        assert instruction_example(decoder_tokenizer, TEXT, label)["input_ids"] == ids_of(
            decoder_tokenizer, conversation
        )


def test_smollm2s_answers_and_end_of_turn_come_from_its_template(decoder_tokenizer):
    tokens = decoder_tokenizer.convert_ids_to_tokens
    assert [tokens(ids) for ids in topic_answer_ids(decoder_tokenizer)] == [
        ["World"],
        ["Sports"],
        ["Business"],
        ["Sci", "/", "Tech"],
    ]
    assert tokens(end_of_turn_ids(decoder_tokenizer)) == ["<|im_end|>", "Ċ"]


def test_a_llama3_style_template_ends_the_answer_with_eot_id():
    tokenizer = llama3_style_tokenizer()
    prompt, completion = completion_ids(tokenizer, TEXT, "Sci/Tech")
    assert tokenizer.decode(prompt).startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert tokenizer.decode(prompt).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert tokenizer.decode(completion) == "Sci/Tech<|eot_id|>"
    name, end = split_answer(tokenizer, "Sci/Tech")
    assert name + end == completion and tokenizer.convert_ids_to_tokens(end) == ["<|eot_id|>"]
    assert end_of_turn_ids(tokenizer) == end
    example = instruction_example(tokenizer, TEXT, 3)
    assert example["labels"] == [IGNORED_LABEL] * len(prompt) + completion
    assert example["input_ids"].count(tokenizer.bos_token_id) == 1, "the template's BOS, none added by the tokenizer"


def test_a_prompt_that_is_not_the_start_of_the_conversation_is_refused():
    """A reasoning model's template opens an empty thought in the prompt that an answered turn does not hold."""
    thinking = LLAMA3_TEMPLATE.replace(
        "assistant<|end_header_id|>\n\n' }}", "assistant<|end_header_id|>\n\n<think></think>' }}"
    )
    assert thinking != LLAMA3_TEMPLATE
    tokenizer = byte_level_tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], thinking)
    with pytest.raises(UserInputError, match="is not the start of the same conversation with the answer"):
        instruction_example(tokenizer, TEXT, 0)


def test_a_template_that_rewrites_the_answer_is_refused():
    shouting = LLAMA3_TEMPLATE.replace("message['content'] | trim", "message['content'] | upper")
    tokenizer = byte_level_tokenizer(["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], shouting)
    with pytest.raises(UserInputError, match=r"not write the answer 'World' as given \(it wrote 'WORLD<\|eot_id\|>'\)"):
        topic_answer_ids(tokenizer)


def test_a_missing_pad_token_is_a_special_token_no_conversation_holds():
    llama3 = llama3_style_tokenizer()
    assert llama3.pad_token is None
    assert ensure_pad_token(llama3) is llama3 and llama3.pad_token == "<|end_of_text|>"
    with_pad = ensure_pad_token(llama3_style_tokenizer(["<|finetune_right_pad_id|>"]))
    assert with_pad.pad_token == "<|finetune_right_pad_id|>", "a token named pad comes first"
    assert with_pad.pad_token_id not in instruction_example(with_pad, TEXT, 1)["input_ids"]


def test_without_a_spare_special_token_the_pad_token_falls_back_to_eos():
    tokenizer = chatml_tokenizer_without_spare_tokens()
    assert ensure_pad_token(tokenizer).pad_token == "<|im_end|>" == tokenizer.eos_token


def test_a_pad_token_the_tokenizer_has_is_kept(decoder_tokenizer):
    assert decoder_tokenizer.pad_token == "<|im_end|>", "SmolLM2 pads with its end of turn"
    assert ensure_pad_token(decoder_tokenizer).pad_token == "<|im_end|>"


def test_padding_is_masked_by_position_so_an_end_of_turn_equal_to_the_pad_keeps_its_label(decoder_tokenizer):
    short = instruction_example(decoder_tokenizer, "Cup final", 1)
    long = instruction_example(decoder_tokenizer, TEXT, 2)
    labels = instruction_collator(decoder_tokenizer)([short, long])["labels"][0].tolist()
    end = decoder_tokenizer.pad_token_id
    assert labels[len(short["labels"]) - 2] == end, "the answer's <|im_end|> is learned"
    assert labels[len(short["labels"]) :] == [IGNORED_LABEL] * (len(long["labels"]) - len(short["labels"]))


def test_the_collator_needs_a_pad_token():
    with pytest.raises(UserInputError, match=r"no pad token, so batches cannot be padded\. .*ensure_pad_token"):
        instruction_collator(llama3_style_tokenizer())


def test_a_llama3_style_batch_pads_with_the_chosen_pad_token():
    tokenizer = ensure_pad_token(llama3_style_tokenizer())
    rows = [instruction_example(tokenizer, text, 0) for text in ("Cup final", TEXT)]
    batch = instruction_collator(tokenizer)(rows)
    padding = len(rows[1]["input_ids"]) - len(rows[0]["input_ids"])
    assert batch["input_ids"][0, -padding:].tolist() == [tokenizer.pad_token_id] * padding
    assert batch["labels"][0].tolist() == rows[0]["labels"] + [IGNORED_LABEL] * padding
    assert tokenizer.convert_ids_to_tokens(rows[0]["labels"][-1]) == "<|eot_id|>"


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
