"""AG News as chat turns for a decoder, and labels that count the answer only (notebook 08).

The classifier of notebooks 04 to 07 reads a text and a head picks one of
four labels. A decoder LLM is asked in words instead: the model's own chat
template wraps a short system prompt and the question with the article, and
the answer it should give is the topic's name. Training then minimises the
loss of the answer tokens only: every prompt position gets the label -100,
which PyTorch's cross-entropy ignores, so the model is not also taught to
reproduce the questions and the articles.

The answer's tokens come from the template itself, for any template: the
conversation with the answer is rendered, the prompt is rendered with the
generation prompt (``add_generation_prompt=True``), and the answer is what the
first adds to the second (TRL's prompt-completion route). So the tokens that
end the assistant's turn are whatever the template writes there: ``<|im_end|>``
and a newline for SmolLM2's ChatML, ``<|eot_id|>`` for Llama 3, ``</s>`` for
Mistral. Nothing assumes that the end of turn is the tokenizer's eos token.
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
PLACEHOLDER_TEXT = "An article."  # the text of the conversation the answers' tokens are read from


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


def token_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """The ids of a rendered template text; no special tokens added, since the template writes its own (a BOS)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_ids(tokenizer: PreTrainedTokenizerBase, text: str, answer: str) -> tuple[list[int], list[int]]:
    """The prompt's ids and the answer's: the conversation rendered with the answer, minus the rendered prompt.

    The answer's part is the answer and everything the template writes after
    it (the end of turn). Raises when the prompt's tokens are not the first
    tokens of the conversation's, because the template renders the earlier
    turns differently once an answer follows, or the tokenizer splits the
    prompt's last characters differently once the answer follows them
    (SmolLM2's tokenizer writes a closing blank line as one token at the end
    of a text, as two before a letter: notebook 08's exercise 3): no split
    into prompt and answer would then be right.
    """
    prompt = token_ids(tokenizer, prompt_text(tokenizer, text))
    conversation = token_ids(tokenizer, tokenizer.apply_chat_template(topic_messages(text, answer), tokenize=False))
    if conversation[: len(prompt)] != prompt or len(conversation) == len(prompt):
        raise UserInputError(
            "This chat template's prompt (add_generation_prompt=True) is not the start of the same conversation "
            "with the answer, token for token, so the answer's tokens cannot be told apart from the prompt's: "
            "either the template renders the earlier turns differently once an answer follows, or the tokenizer "
            "splits the prompt's last characters into other tokens once the answer follows them. Use a model whose "
            "own template and tokenizer agree on where the prompt ends."
        )
    return prompt, conversation[len(prompt) :]


def split_answer(tokenizer: PreTrainedTokenizerBase, answer: str) -> tuple[list[int], list[int]]:
    """The answer's own tokens and the end-of-turn tokens after them, as the template writes them.

    The answer's tokens are the shortest start of the completion that decodes
    to the answer (a SentencePiece tokenizer writes ``▁Business``, a byte-level
    one ``Business``); the rest closes the turn.
    """
    _, completion = completion_ids(tokenizer, PLACEHOLDER_TEXT, answer)
    for end in range(1, len(completion) + 1):
        if tokenizer.decode(completion[:end]).strip() == answer.strip():
            return completion[:end], completion[end:]
    raise UserInputError(
        f"The chat template does not write the answer {answer!r} as given (it wrote "
        f"{tokenizer.decode(completion)!r}), so its tokens cannot be scored. Use a model whose template keeps "
        "the assistant's text as it is."
    )


def topic_answer_ids(tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """Each topic name's tokens as the template writes them in the answer, in label order."""
    return [split_answer(tokenizer, name)[0] for name in LABEL_NAMES]


def end_of_turn_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The tokens the template writes after an answer (the end of turn, which the model must learn to emit)."""
    ends = {tuple(split_answer(tokenizer, name)[1]) for name in LABEL_NAMES}
    if len(ends) != 1 or not next(iter(ends)):
        raise UserInputError(
            "This chat template does not close the assistant's turn with the same tokens after every answer, "
            "so the model cannot be taught one way to stop. Use a model whose template ends each turn with a token."
        )
    return list(ends.pop())


def truncate_text(tokenizer: PreTrainedTokenizerBase, text: str, max_tokens: int) -> str:
    """The article cut to its first ``max_tokens`` tokens: the prompt's cost grows with every token it keeps."""
    ids = token_ids(tokenizer, text)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])


def instruction_example(tokenizer: PreTrainedTokenizerBase, text: str, label: int) -> dict[str, list[int]]:
    """Token ids of prompt and answer, with labels -100 on the prompt: the loss counts the answer tokens only.

    The answer is the topic's name and the template's end of turn
    (``completion_ids``), so the model learns to name the topic and to stop.
    """
    if label not in range(len(LABEL_NAMES)):
        raise UserInputError(f"Label {label} is outside 0 to {len(LABEL_NAMES) - 1} ({', '.join(LABEL_NAMES)}).")
    prompt_ids, answer_ids = completion_ids(tokenizer, text, LABEL_NAMES[label])
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


def spare_special_tokens(tokenizer: PreTrainedTokenizerBase) -> list[str]:
    """Special tokens a conversation never contains: not BOS, not EOS, not written by the chat template.

    Those whose name says ``pad`` come first (Llama 3.1's ``<|finetune_right_pad_id|>``),
    then the unknown token, then the others in id order (Llama 3's reserved tokens).
    """
    conversation = tokenizer.apply_chat_template(topic_messages(PLACEHOLDER_TEXT, LABEL_NAMES[0]), tokenize=False)
    used = set(token_ids(tokenizer, conversation)) | {tokenizer.bos_token_id, tokenizer.eos_token_id}
    spare = [
        token.content
        for token_id, token in sorted(tokenizer.added_tokens_decoder.items())
        if token.special and token_id not in used
    ]
    named_pad = [token for token in spare if "pad" in token.lower()]
    unknown = [tokenizer.unk_token] if tokenizer.unk_token and tokenizer.unk_token_id not in used else []
    return list(dict.fromkeys(named_pad + unknown + spare))


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one (in place), and return it; one that has a pad token keeps it.

    Batches of rows of different lengths are padded, so the tokenizer needs a
    pad token; Llama 3, Llama 2 and Mistral have none. The common shortcut,
    ``pad_token = eos_token``, is a trap where the end of turn is the eos
    token (SmolLM2's ``<|im_end|>``, Llama 3's ``<|eot_id|>`` in its instruct
    tokenizer): a collator that builds the labels from the ids and masks every
    id equal to the pad id (``DataCollatorForLanguageModeling`` does) then
    masks the answer's end of turn too, and the model never learns to stop.

    The rule here: padding is masked by position, never by id. The collator
    (``instruction_collator``) pads the labels itself with -100 and the
    attention mask with 0, so a real end-of-turn token keeps its label even
    when it equals the pad token (SmolLM2's own pad token is ``<|im_end|>``,
    and that is safe here). A missing pad token is still set to a token no
    conversation contains (``spare_special_tokens``), so that the rows stay
    right with a collator that masks by id; only a tokenizer with no spare
    special token falls back to eos. Nothing is added to the vocabulary, which
    would need a new, untrained embedding row in a model whose embeddings QLoRA
    keeps frozen.
    """
    if tokenizer.pad_token is None:
        check_chat_template(tokenizer)
        spare = spare_special_tokens(tokenizer)
        tokenizer.pad_token = spare[0] if spare else tokenizer.eos_token
    return tokenizer


def instruction_collator(tokenizer: PreTrainedTokenizerBase) -> DataCollatorForSeq2Seq:
    """Pads a batch to its longest row: input ids with the pad token, labels with -100 (padding has no loss)."""
    if tokenizer.pad_token is None:
        raise UserInputError(
            "This tokenizer has no pad token, so batches cannot be padded. Give it one with "
            "qlora_tutorial.chat.ensure_pad_token(tokenizer) (decoder.load_decoder_tokenizer does)."
        )
    return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORED_LABEL)
