"""Tiny chat tokenizers built offline: byte-level BPE over GPT-2's byte alphabet, with a chat template.

Each spells any text (one token per byte, plus the merges given), so the
topic names and the articles of AG News tokenize without a download. The
Llama-3-style one ends turns with ``<|eot_id|>`` and has no pad token, as
Llama 3's instruct tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIAL = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CHATML_SPECIAL = ("<|im_start|>", "<|im_end|>")


def byte_level_tokenizer(
    special_tokens: Sequence[str], chat_template: str, merges: Sequence[tuple[str, str]] = (), **named: str
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: the special tokens first, then the 256 byte tokens, then the merges' tokens.

    ``named`` sets the tokenizer's named tokens (``bos_token``, ``eos_token``, ...); a pad token only if given.
    """
    tokens = [*special_tokens, *bytes_to_unicode().values(), *("".join(pair) for pair in merges)]
    backend = Tokenizer(models.BPE(vocab={token: i for i, token in enumerate(tokens)}, merges=list(merges)))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in special_tokens])
    return PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=chat_template, **named)


def llama3_style_tokenizer(extra_special: Sequence[str] = ()) -> PreTrainedTokenizerFast:
    """Llama 3's chat format: headers, turns ended by ``<|eot_id|>`` (the eos), a BOS, and no pad token.

    With no merges, every topic name is one token per letter: Sports and Sci/Tech both start with ``S``.
    """
    return byte_level_tokenizer(
        [*LLAMA3_SPECIAL, *extra_special], LLAMA3_TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )


def chatml_tokenizer_without_spare_tokens() -> PreTrainedTokenizerFast:
    """ChatML with only the two turn tokens, eos ``<|im_end|>`` and no pad: no special token is left over."""
    return byte_level_tokenizer(CHATML_SPECIAL, CHATML_TEMPLATE, eos_token="<|im_end|>")
