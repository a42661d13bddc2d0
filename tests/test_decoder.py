"""Notebook 08's decoder: adapters on every linear layer, topic scoring and generation, its run and data."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from bitsandbytes.nn import Linear4bit
from huggingface_hub.errors import GatedRepoError
from huggingface_hub.utils import httpx  # the HTTP client the Hub uses (its errors hold one of its responses)
from tiny_tokenizers import llama3_style_tokenizer
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    TrainerCallback,
    TrainerControl,
    TrainerState,
)

from qlora_tutorial import decoder, decoder_pipeline, decoder_shipping
from qlora_tutorial.chat import ensure_pad_token, prompt_text, topic_answer_ids
from qlora_tutorial.data import LABEL_NAMES, load_splits
from qlora_tutorial.decoder import (
    ALL_LINEAR_TARGETS,
    ATTENTION_TARGETS,
    answer_share,
    attach_decoder_lora,
    calibrated_scores,
    decoder_config,
    decoder_lora_config,
    generate_answers,
    load_decoder,
    load_decoder_tokenizer,
    lora_parameters_by_target,
    score_topics,
    stop_token_ids,
    topic_scores,
    topic_token_ids,
)
from qlora_tutorial.decoder_pipeline import (
    NoFinalCheckpoint,
    checkpoints,
    decoder_splits,
    decoder_training_arguments,
    train_resuming,
)
from qlora_tutorial.decoder_profile import DECODER_MODEL_ENV, DecoderProfile, decoder_profile
from qlora_tutorial.decoder_shipping import (
    dequantized_decoder,
    evaluation_decoder,
    load_shipped_adapter,
    load_trained_decoder,
    merge_adapter,
    merge_decoder,
    merge_rounding,
    save_adapter,
)
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import FitVerdict, RunWouldNotFit
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


@pytest.fixture(scope="module")
def llama3_style() -> tuple[torch.nn.Module, PreTrainedTokenizerBase]:
    """A random 2-layer Llama over the Llama-3-style byte tokenizer: names of 5 to 8 tokens, two starting with S."""
    tokenizer = ensure_pad_token(llama3_style_tokenizer())
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|end_of_text|>"),
    )
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture
def trained_adapter(decoder_settings, tiny_profile, tmp_path) -> Path:
    """A saved adapter of the tiny Llama whose B matrices are random (an untrained adapter changes nothing)."""
    model = attach_decoder_lora(load_decoder(decoder_settings, tiny_profile), decoder_settings, tiny_profile)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    tokenizer = load_decoder_tokenizer(decoder_settings, tiny_profile)
    return save_adapter(model, tokenizer, tmp_path / "adapter")


def whole_name_log_probs(model, tokenizer, prompt: str) -> np.ndarray:
    """Each topic name's log-probability after ``prompt``, the slow way: one full forward pass per name."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    scores = []
    for name in topic_answer_ids(tokenizer):
        with torch.no_grad():
            logits = model(torch.tensor([prompt_ids + name])).logits[0].float()
        log_probs = torch.log_softmax(logits, dim=-1)
        scores.append(sum(float(log_probs[len(prompt_ids) - 1 + j, token]) for j, token in enumerate(name)))
    return np.asarray(scores)


def test_topic_token_ids_are_the_distinct_first_tokens_of_the_names(decoder_tokenizer):
    ids = topic_token_ids(decoder_tokenizer)
    assert len(set(ids)) == len(LABEL_NAMES)
    assert ids == [decoder_tokenizer(name, add_special_tokens=False)["input_ids"][0] for name in LABEL_NAMES]
    assert decoder_tokenizer.decode(ids[3]) == "Sci", "Sci/Tech is more than one token; its first is scored"


def test_first_token_scores_of_names_that_share_a_first_token_are_refused(llama3_style):
    model, tokenizer = llama3_style
    with pytest.raises(UserInputError, match=r"start with the same token in this tokenizer .*Score whole names"):
        topic_token_ids(tokenizer)
    with pytest.raises(UserInputError, match="start with the same token"):
        score_topics(model, tokenizer, [prompt_text(tokenizer, HEADLINES[0])], whole_names=False)


def test_scores_are_whole_name_log_probabilities_in_input_order(tiny_llama, decoder_tokenizer, topic_prompts):
    tiny_llama.train()
    scores = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2)
    assert tiny_llama.training, "the model's mode is restored"
    assert scores.shape == (len(HEADLINES), len(LABEL_NAMES)) and scores.dtype == np.float32
    tiny_llama.eval()
    for row, prompt in zip(scores, topic_prompts, strict=True):
        np.testing.assert_allclose(row, whole_name_log_probs(tiny_llama, decoder_tokenizer, prompt), atol=1e-4)


def test_first_token_scores_are_the_answer_positions_log_probabilities(tiny_llama, decoder_tokenizer, topic_prompts):
    scores = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2, whole_names=False)
    ids = topic_token_ids(decoder_tokenizer)
    for row, prompt in zip(scores, topic_prompts, strict=True):
        batch = decoder_tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            expected = torch.log_softmax(tiny_llama(**batch).logits[0, -1], dim=-1)[ids].numpy()
        np.testing.assert_allclose(row, expected, atol=1e-4)
    whole = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2)
    np.testing.assert_allclose(whole[:, :3], scores[:, :3], atol=1e-5)  # World, Sports, Business: one token each
    assert np.all(whole[:, 3] < scores[:, 3]), "Sci/Tech's later tokens lower its score below Sci's"


def test_topic_scores_give_both_readings_from_one_pass(tiny_llama, decoder_tokenizer, topic_prompts):
    both = topic_scores(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2)
    whole = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2)
    first = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=2, whole_names=False)
    np.testing.assert_allclose(both.whole_name, whole, atol=1e-5)
    np.testing.assert_allclose(both.first_token, first, atol=1e-5)
    assert np.all(both.first_token >= both.whole_name), "a first token is at least as likely as the name it starts"


def test_topic_scores_read_a_shared_first_token_the_same(llama3_style):
    """Where two names share a first token (Sports, Sci/Tech here), the first-token reading cannot tell them apart."""
    model, tokenizer = llama3_style
    both = topic_scores(model, tokenizer, [prompt_text(tokenizer, text) for text in HEADLINES])
    np.testing.assert_array_equal(both.first_token[:, 1], both.first_token[:, 3])
    assert np.all(both.whole_name[:, 1] != both.whole_name[:, 3])


def test_names_of_many_tokens_sharing_a_first_token_score_whole(llama3_style):
    model, tokenizer = llama3_style
    names = topic_answer_ids(tokenizer)
    assert [len(ids) for ids in names] == [5, 6, 8, 8] and names[1][0] == names[3][0]
    asked = [prompt_text(tokenizer, text) for text in HEADLINES]
    scores = score_topics(model, tokenizer, asked, batch_size=3)
    assert np.ptp(scores[:, 1] - scores[:, 3]) > 0, "Sports and Sci/Tech differ beyond their shared first token"
    for row, prompt in zip(scores, asked, strict=True):
        np.testing.assert_allclose(row, whole_name_log_probs(model, tokenizer, prompt), atol=1e-4)


def test_a_row_scores_the_same_alone_as_in_a_padded_batch(tiny_llama, decoder_tokenizer, topic_prompts):
    """Left padding: each row's last position is its own answer position, whatever its neighbours' lengths."""
    lengths = [len(decoder_tokenizer(p, add_special_tokens=False)["input_ids"]) for p in topic_prompts]
    assert len(set(lengths)) == len(lengths), "every row of the batch is padded differently"
    batched = score_topics(tiny_llama, decoder_tokenizer, topic_prompts, batch_size=len(topic_prompts))
    alone = np.concatenate([score_topics(tiny_llama, decoder_tokenizer, [prompt]) for prompt in topic_prompts])
    assert np.ptp(alone, axis=0).min() > 0.1, "the rows' scores differ, so a mix-up would show"
    np.testing.assert_allclose(batched, alone, atol=1e-4)


def test_the_answer_share_is_the_probability_the_four_names_hold():
    scores = np.log([[0.5, 0.2, 0.1, 0.1], [0.01, 0.02, 0.03, 0.04]])
    np.testing.assert_allclose(answer_share(scores), [0.9, 0.1])


def test_calibration_subtracts_each_topics_mean_score():
    """A model that leans to World on every row: each row's own topic scores -2, World -1, the others -4."""
    scores = np.full((4, 4), -4.0)
    scores[np.arange(4), np.arange(4)] = -2.0
    scores[:, 0] = -1.0
    calibrated = calibrated_scores(scores)
    np.testing.assert_allclose(calibrated.mean(axis=0), 0, atol=1e-12)
    assert list(scores.argmax(1)) == [0, 0, 0, 0] and list(calibrated.argmax(1)) == [0, 1, 2, 3]
    content_free = np.array([[-1.0, -2.0, -3.0, -4.0]])
    np.testing.assert_allclose(calibrated_scores(scores, content_free), scores - content_free)


def test_generation_is_greedy_and_the_same_alone_as_in_a_batch(tiny_llama, decoder_tokenizer, topic_prompts):
    tiny_llama.train()
    asked = topic_prompts[:3]  # three lengths: two of the rows are padded in the batch
    answers = generate_answers(tiny_llama, decoder_tokenizer, asked, max_new_tokens=3)
    assert tiny_llama.training, "the model's mode is restored"
    assert len(answers) == len(asked) and all(answers)
    assert answers == [generate_answers(tiny_llama, decoder_tokenizer, [p], max_new_tokens=3)[0] for p in asked]
    assert all(len(decoder_tokenizer(answer, add_special_tokens=False)["input_ids"]) <= 5 for answer in answers)


def test_generation_stops_at_the_models_eos_and_the_templates_end_of_turn(llama3_style):
    model, tokenizer = llama3_style
    stops = stop_token_ids(model, tokenizer)
    assert tokenizer.convert_ids_to_tokens(stops) == ["<|end_of_text|>", "<|eot_id|>"]
    assert len(generate_answers(model, tokenizer, [prompt_text(tokenizer, HEADLINES[0])], max_new_tokens=2)) == 1


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


def test_the_dequantized_decoder_holds_the_nf4_weights_and_the_4bit_models_arithmetic(
    decoder_settings, tiny_profile, decoder_tokenizer, tmp_path
):
    quantized = load_decoder(decoder_settings, tiny_profile, "nf4-dq")
    original = load_decoder(decoder_settings, tiny_profile, "fp32").state_dict()
    base = dequantized_decoder(decoder_settings, tiny_profile)
    four_bit = {name: layer for name, layer in quantized.named_modules() if isinstance(layer, Linear4bit)}
    assert len(four_bit) == 2 * len(ALL_LINEAR_TARGETS), "every linear layer but lm_head is 4-bit"
    assert not any(isinstance(layer, Linear4bit) for layer in base.modules())
    for name, layer in four_bit.items():
        weight = base.get_submodule(name).weight
        assert torch.equal(weight, dequantize_4bit(layer.weight.data, layer.weight.quant_state))
        assert not torch.equal(weight, original[f"{name}.weight"]), "rounded to NF4"
    untouched = [name for name in original if name.removesuffix(".weight") not in four_bit]
    assert all(torch.equal(base.state_dict()[name], original[name]) for name in untouched)
    assert {parameter.dtype for parameter in base.parameters()} == {torch.float32}, "the CPU's compute dtype"
    batch = decoder_tokenizer(HEADLINES[1], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(base(**batch).logits, quantized(**batch).logits, atol=1e-4, rtol=1e-4)
    base.save_pretrained(tmp_path / "plain")
    assert "quantization_config" not in (tmp_path / "plain" / "config.json").read_text(), "an ordinary checkpoint"


def test_the_merge_is_the_4bit_model_with_its_adapter_as_plain_weights(
    decoder_settings, tiny_profile, trained_adapter, topic_prompts, decoder_tokenizer, tmp_path
):
    trained = load_trained_decoder(decoder_settings, tiny_profile, trained_adapter)
    expected = score_topics(trained, decoder_tokenizer, topic_prompts)
    merged = merge_decoder(decoder_settings, tiny_profile, trained_adapter)
    assert type(merged) is LlamaForCausalLM and {p.dtype for p in merged.parameters()} == {torch.float32}
    assert not any(isinstance(layer, Linear4bit) or "lora" in name for name, layer in merged.named_modules())
    np.testing.assert_allclose(score_topics(merged, decoder_tokenizer, topic_prompts), expected, atol=1e-4)
    untrained = score_topics(dequantized_decoder(decoder_settings, tiny_profile), decoder_tokenizer, topic_prompts)
    assert np.abs(untrained - expected).max() > 0.01, "the adapter changes the scores, so a lost update would show"
    merged.save_pretrained(tmp_path / "merged")
    assert "quantization_config" not in (tmp_path / "merged" / "config.json").read_text()


def test_a_16_bit_merge_rounds_the_update(
    decoder_settings, tiny_profile, trained_adapter, topic_prompts, decoder_tokenizer
):
    trained = load_trained_decoder(decoder_settings, tiny_profile, trained_adapter)
    expected = score_topics(trained, decoder_tokenizer, topic_prompts)
    assert merge_rounding(trained, torch.float32).relative_error == 0.0, "fp32 holds the sum computed in fp32"
    rounding = merge_rounding(trained, torch.bfloat16)
    assert rounding.dtype == "bfloat16" and 0 < rounding.relative_error < 1 and 0 < rounding.unmoved_share < 1
    merged = merge_adapter(trained, torch.bfloat16)
    assert {parameter.dtype for parameter in merged.parameters()} == {torch.bfloat16}
    scores = score_topics(merged, decoder_tokenizer, topic_prompts)
    assert 0 < np.abs(scores - expected).max() < 0.5


def test_the_adapter_ships_alone_and_reloads_onto_a_fresh_4bit_base(
    decoder_settings, tiny_profile, trained_adapter, topic_prompts, decoder_tokenizer
):
    files = {path.name for path in trained_adapter.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "chat_template.jinja", "tokenizer.json"} <= files
    assert not any(name.startswith("model") for name in files), "no base weights in the shipped folder"
    model, tokenizer = load_shipped_adapter(decoder_settings, tiny_profile, trained_adapter)
    assert tokenizer.chat_template == decoder_tokenizer.chat_template and tokenizer.pad_token is not None
    assert sum(isinstance(layer, Linear4bit) for layer in model.modules()) == 2 * len(ALL_LINEAR_TARGETS)
    expected = score_topics(
        load_trained_decoder(decoder_settings, tiny_profile, trained_adapter), tokenizer, topic_prompts
    )
    np.testing.assert_array_equal(score_topics(model, tokenizer, topic_prompts), expected)
    assert generate_answers(model, tokenizer, topic_prompts[:1], max_new_tokens=2)


def test_a_folder_without_an_adapter_says_how_to_train_one(decoder_settings, tiny_profile, tmp_path):
    with pytest.raises(
        FileNotFoundError,
        match=r"adapter_config\.json is missing\)\. Train one first: python -m qlora_tutorial train-decoder",
    ):
        load_shipped_adapter(decoder_settings, tiny_profile, tmp_path)


def test_cuda_evaluates_the_4bit_model_and_a_cpu_a_dequantized_copy(monkeypatch, decoder_settings, tiny_profile):
    calls = []
    monkeypatch.setattr(decoder_shipping, "load_decoder", lambda s, p, precision: calls.append(precision) or "4-bit")
    monkeypatch.setattr(decoder_shipping, "load_trained_decoder", lambda s, p, folder: f"4-bit + {folder}")
    monkeypatch.setattr(decoder_shipping, "dequantized_decoder", lambda s, p: "dequantized")
    monkeypatch.setattr(decoder_shipping, "merge_decoder", lambda s, p, folder: f"merged {folder}")
    on_gpu = replace(decoder_settings, device="cuda")
    assert evaluation_decoder(on_gpu, tiny_profile) == "4-bit" and calls == [decoder.QLORA_PRECISION]
    assert evaluation_decoder(on_gpu, tiny_profile, "run") == "4-bit + run"
    assert evaluation_decoder(decoder_settings, tiny_profile) == "dequantized"
    assert evaluation_decoder(decoder_settings, tiny_profile, "run") == "merged run"


def test_two_builds_start_from_the_same_adapters(decoder_settings, tiny_profile):
    def lora_weights() -> dict[str, torch.Tensor]:
        model = attach_decoder_lora(load_decoder(decoder_settings, tiny_profile), decoder_settings, tiny_profile)
        torch.rand(100)  # whatever runs after the build does not matter
        return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_A" in name}

    torch.manual_seed(123)
    first = lora_weights()
    torch.manual_seed(456)
    second = lora_weights()
    assert first.keys() == second.keys() and len(first) == 2 * len(ALL_LINEAR_TARGETS)
    assert all(torch.equal(first[name], second[name]) for name in first)
    other_seed = replace(decoder_settings, profile=replace(decoder_settings.profile, seed=7))
    other = attach_decoder_lora(load_decoder(other_seed, tiny_profile), other_seed, tiny_profile)
    name = next(iter(first))
    assert not torch.equal(dict(other.named_parameters())[name], first[name]), "the seed decides them"


def gated(model_name: str) -> OSError:
    """The error transformers raises for a gated repository, with the Hub's error as its cause."""
    response = httpx.Response(401, request=httpx.Request("GET", f"https://huggingface.co/{model_name}"))
    error = OSError(f"You are trying to access a gated repo.\nMake sure to have access to it at {model_name}.")
    error.__cause__ = GatedRepoError("401 Client Error", response=response)
    return error


@pytest.mark.parametrize(
    ("token", "advice"),
    [(None, "create an access token .* set the environment variable HF_TOKEN"), ("hf_x", "HF_TOKEN is set, but")],
)
def test_a_gated_model_says_to_set_hf_token(monkeypatch, decoder_settings, token, advice):
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    name = "meta-llama/Llama-3.1-8B-Instruct"
    profile = decoder_profile(decoder_settings, model_name=name)

    def refuse(*args, **kwargs):
        raise gated(name)

    for loader in ("AutoModelForCausalLM", "AutoTokenizer", "AutoConfig"):
        monkeypatch.setattr(getattr(decoder, loader), "from_pretrained", refuse)
    message = f"{name} is a gated model on the Hugging Face Hub. .*{advice}"
    for load in (load_decoder, load_decoder_tokenizer, decoder_config):
        with pytest.raises(UserInputError, match=message):
            load(decoder_settings, profile)


def test_other_load_errors_pass_through(monkeypatch, decoder_settings):
    def missing(*args, **kwargs):
        raise OSError("no such model")

    monkeypatch.setattr(decoder.AutoModelForCausalLM, "from_pretrained", missing)
    with pytest.raises(OSError, match="no such model"):
        load_decoder(decoder_settings, decoder_profile(decoder_settings, model_name="owner/model"))


def test_the_decoder_model_can_be_set_in_the_environment(monkeypatch, decoder_settings, tiny_llama_dir, tmp_path):
    monkeypatch.setenv(DECODER_MODEL_ENV, str(tiny_llama_dir))
    profile = decoder_profile(decoder_settings)
    assert (profile.model_name, profile.model_revision) == (str(tiny_llama_dir), None)
    assert decoder_profile(decoder_settings, model_name="owner/other").model_name == "owner/other", "changes win"
    monkeypatch.setenv(DECODER_MODEL_ENV, str(tmp_path))
    with pytest.raises(UserInputError, match=f"{DECODER_MODEL_ENV}={tmp_path} is a folder without config.json"):
        decoder_profile(decoder_settings)


def test_the_decoder_table_names_the_profile_and_leaves_the_classifiers_settings_out(decoder_settings, tiny_profile):
    table = tiny_profile.table(decoder_settings)
    lines = table.splitlines()
    assert lines[0].split(maxsplit=1) == ["profile", "smoke (CI: every notebook in about a minute)"]
    names = [line.split()[0] for line in lines]
    assert names[:6] == ["profile", "data", "device", "compute", "optimizer", "runs"]
    assert "model_name" in names and "gradient_checkpointing" in names and "max_text_tokens" in names
    assert not {"epochs", "max_length", "train_pool_rows", "model"} & set(names), "the classifier's fields stay out"
    assert f"model_name              {tiny_profile.model_name}" in table, "values align in one column"


def test_the_gpu_profile_checkpoints_gradients_and_saves_every_100_steps(decoder_settings):
    gpu = decoder_profile(replace(decoder_settings, profile=replace(decoder_settings.profile, name="gpu")))
    assert gpu.gradient_checkpointing and gpu.save_steps == 100 and gpu.steps % gpu.save_steps == 0
    assert not decoder_profile(decoder_settings).gradient_checkpointing, "off on the CPU profiles"


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
    arguments = decoder_training_arguments(decoder_settings, tiny_profile, tmp_path)
    assert arguments.activation_checkpointing is tiny_profile.gradient_checkpointing is False, "the profile's"
    assert arguments.save_strategy == "steps" and arguments.save_steps == tiny_profile.save_steps == 2
    assert arguments.save_total_limit == 1
    arguments = decoder_training_arguments(decoder_settings, tiny_profile, tmp_path, activation_checkpointing=True)
    assert arguments.max_steps == tiny_profile.steps == 4
    assert arguments.per_device_train_batch_size == tiny_profile.batch_size
    assert arguments.learning_rate == tiny_profile.learning_rate
    assert arguments.warmup_steps == tiny_profile.warmup_steps
    assert arguments.eval_strategy == "no" and arguments.logging_steps == 1
    assert arguments.include_num_input_tokens_seen == "non_padding"
    assert arguments.activation_checkpointing is True
    assert arguments.seed == decoder_settings.profile.seed and arguments.report_to == []


class FakeTrainer:
    """What ``train_resuming`` uses of a ``Trainer``: its output folder, its callbacks, and ``train`` (which saves)."""

    def __init__(self, output_dir: Path) -> None:
        self.args = SimpleNamespace(output_dir=str(output_dir))
        self.resumed_from: list[str | None] = []
        self.callbacks: list[type] = []

    def add_callback(self, callback: type) -> None:
        self.callbacks.append(callback)

    def train(self, resume_from_checkpoint: str | None = None) -> str:
        self.resumed_from.append(resume_from_checkpoint)
        (Path(self.args.output_dir) / "checkpoint-8").mkdir(parents=True, exist_ok=True)
        return "trained"


def test_an_interrupted_run_resumes_from_its_last_checkpoint_and_a_finished_one_cleans_up(tmp_path, capsys):
    trainer = FakeTrainer(tmp_path / "run")
    assert train_resuming(trainer) == "trained" and trainer.resumed_from == [None], "no folder yet: a fresh start"
    assert trainer.callbacks == [NoFinalCheckpoint]
    assert checkpoints(tmp_path / "run") == [], "a finished run removes its checkpoints"
    for step in (2, 10, 4):
        (tmp_path / "run" / f"checkpoint-{step}").mkdir()
    (tmp_path / "run" / "adapter_config.json").write_text("{}")
    train_resuming(trainer)
    assert trainer.resumed_from[-1] == str(tmp_path / "run" / "checkpoint-10"), "the last one, by step"
    assert "resuming from checkpoint-10" in capsys.readouterr().out
    assert checkpoints(tmp_path / "run") == [] and (tmp_path / "run" / "adapter_config.json").is_file()


def test_the_last_steps_checkpoint_is_skipped_and_the_others_kept():
    skip = NoFinalCheckpoint()
    for step, saved in ((2, True), (4, False)):
        control = TrainerControl(should_save=True)
        skip.on_step_end(SimpleNamespace(), TrainerState(global_step=step, max_steps=4), control)
        assert control.should_save is saved


@pytest.mark.slow
def test_a_run_cut_off_after_a_checkpoint_resumes_there(decoder_settings, tiny_profile, tmp_path, monkeypatch):
    """The real Trainer: stopped after step 2 (a checkpoint), started again, it trains steps 3 and 4 only."""

    class Disconnect(Exception):
        pass

    real_train = decoder_pipeline.Trainer.train
    stop = {"at": 2}

    def cut_off(self, *args, **kwargs):
        if stop["at"] is not None:
            self.add_callback(StopAfter(stop["at"]))
        return real_train(self, *args, **kwargs)

    class StopAfter(TrainerCallback):
        def __init__(self, step: int) -> None:
            self.step = step

        def on_save(self, args, state, control, **kwargs):
            if state.global_step == self.step:
                raise Disconnect

    monkeypatch.setattr(decoder_pipeline.Trainer, "train", cut_off)
    output = tmp_path / "run"
    with pytest.raises(Disconnect):
        decoder_pipeline.train_decoder(decoder_settings, tiny_profile, output)
    assert [folder.name for folder in checkpoints(output)] == ["checkpoint-2"]
    stop["at"] = None
    results = decoder_pipeline.train_decoder(decoder_settings, tiny_profile, output)
    assert results["train_steps"] == 4 and len(results["step_seconds"]) == 2, "steps 3 and 4 only"
    assert checkpoints(output) == [] and (output / "adapter_model.safetensors").is_file()


def test_the_command_lines_run_trains_at_the_micro_batch_the_estimator_says_fits(
    decoder_settings, tiny_profile, tmp_path, monkeypatch
):
    """As notebook 08 does: the largest batch that fits, gradient accumulation for the rest; none fits, no load."""

    class Stop(Exception):
        pass

    asked, overrides = [], {}

    def verdicts(spec, available, where):
        asked.append(spec)
        return {4: FitVerdict(False, "batch 4 needs too much"), 2: FitVerdict(True, "batch 2 fits")}

    def arguments(settings, profile, output_dir, **changes):
        overrides.update(changes)
        raise Stop

    monkeypatch.setattr(decoder_pipeline, "batch_verdicts", verdicts)
    monkeypatch.setattr(decoder_pipeline, "decoder_training_arguments", arguments)
    with pytest.raises(Stop):
        decoder_pipeline.train_decoder(decoder_settings, tiny_profile, tmp_path / "run", gradient_checkpointing=True)
    assert asked[0].batch_size == tiny_profile.batch_size == 4 and asked[0].gradient_checkpointing is True
    assert overrides["per_device_train_batch_size"] == 2 and overrides["gradient_accumulation_steps"] == 2

    def no_load(*args, **kwargs):
        pytest.fail("the model was loaded for a run that does not fit")

    monkeypatch.setattr(decoder_pipeline, "batch_verdicts", lambda *a: {1: FitVerdict(False, "batch 1 needs 9 GiB")})
    monkeypatch.setattr(decoder_pipeline, "load_decoder", no_load)
    with pytest.raises(RunWouldNotFit, match=r"batch 1 needs 9 GiB.*more memory"):
        decoder_pipeline.train_decoder(decoder_settings, tiny_profile, tmp_path / "run")
