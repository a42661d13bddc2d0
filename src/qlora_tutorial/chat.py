"""AG News as chat turns for a decoder, and labels that count the answer only (notebook 08).

The classifier of notebooks 04 to 07 reads a text and a head picks one of
four labels. A decoder LLM is asked in words instead: the model's own chat
template wraps a short system prompt and the question with the article, and
the answer it should give is the topic's name. Training then minimises the
loss of the answer tokens only: every prompt position gets the label -100,
which PyTorch's cross-entropy ignores, so the model is not also taught to
reproduce the questions and the articles.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, PreTrainedTokenizerBase

from qlora_tutorial.data import LABEL_NAMES
from qlora_tutorial.errors import UserInputError

SYSTEM_PROMPT = "You sort news articles by topic."
QUESTION = "Topic of this article (World, Sports, Business or Sci/Tech)?"
IGNORED_LABEL = -100  # torch.nn.CrossEntropyLoss's ignore_index: no loss, no gradient


def topic_messages(text: str, answer: str | None = None) -> list[dict[str, str]]:
    """The chat turns of one article: system prompt, the question with the text, and the answer if given."""
    messages = [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": f"{QUESTION}\n\n{text}"},
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return messages


def check_chat_template(tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer without a chat template (a base model rather than an instruction-tuned one)."""
    if not tokenizer.chat_template:
        raise UserInputError(
            "This tokenizer has no chat template, so it is not an instruction-tuned (chat) model. "
            "Use an -Instruct model such as SmolLM2-135M-Instruct (the CPU profiles' default)."
        )


def prompt_text(tokenizer: PreTrainedTokenizerBase, text: str) -> str:
    """The prompt as the model sees it: the template's text up to where the assistant's answer begins."""
    check_chat_template(tokenizer)
    return tokenizer.apply_chat_template(topic_messages(text), tokenize=False, add_generation_prompt=True)


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token(s) that close the assistant's turn, which the model must learn to emit after the answer."""
    return tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]


def truncate_text(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    """The article cut to its first ``max_tokens`` tokens: the prompt's cost grows with every token it keeps."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def instruction_example(tokenizer: PreTrainedTokenizerBase, text: str, label: int) -> dict[str, list[int]]:
    """Token ids of prompt and answer, with labels -100 on the prompt: the loss counts the answer tokens only."""
    if label not in range(len(LABEL_NAMES)):
        raise UserInputError(f"Label {label} is outside 0 to {len(LABEL_NAMES) - 1} ({', '.join(LABEL_NAMES)}).")
    prompt_ids = tokenizer(prompt_text(tokenizer, text), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(LABEL_NAMES[label], add_special_tokens=False)["input_ids"] + end_of_turn_ids(tokenizer)
    return {
        "input_ids": prompt_ids + answer_ids,
        "attention_mask": [1] * (len(prompt_ids) + len(answer_ids)),
        "labels": [IGNORED_LABEL] * len(prompt_ids) + answer_ids,
    }


def tokenize_instructions(dataset: Dataset, tokenizer: PreTrainedTokenizerBase, max_text_tokens: int) -> Dataset:
    """Every row of an AG News split as an instruction example (``input_ids``, ``attention_mask``, ``labels``)."""

    def encode(row: dict[str, Any]) -> dict[str, list[int]]:
        return instruction_example(tokenizer, truncate_text(tokenizer, row["text"], max_text_tokens), row["label"])

    return dataset.map(encode, remove_columns=dataset.column_names, desc="Formatting as chat turns")


def prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_text_tokens: int) -> list[str]:
    """The prompts of many articles, each cut to ``max_text_tokens`` tokens as in training."""
    return [prompt_text(tokenizer, truncate_text(tokenizer, text, max_text_tokens)) for text in texts]


def instruction_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads a batch to its longest row: input ids with the pad token, labels with -100 (padding has no loss)."""
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORED_LABEL)
