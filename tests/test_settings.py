from pathlib import Path

import pytest
import torch

from qlora_tutorial import settings as settings_module
from qlora_tutorial.settings import PROFILES, compute_dtype_for, get_profile, load_settings, with_profile_changes
from qlora_tutorial.sources import BERT_BASE_REVISION, PACKAGED_MINILM


def test_default_profile_is_cpu_without_cuda():
    assert load_settings().profile.name == "cpu"


def test_default_profile_is_gpu_with_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert settings_module.default_profile_name() == "gpu"


def test_environment_picks_profile_and_argument_wins(monkeypatch):
    monkeypatch.setenv("QLORA_PROFILE", "smoke")
    assert load_settings().profile.name == "smoke"
    assert load_settings("cpu").profile.name == "cpu"


def test_unknown_profile_names_it_and_lists_valid_ones(monkeypatch):
    monkeypatch.setenv("QLORA_PROFILE", "laptop")
    with pytest.raises(ValueError, match=r"Unknown profile 'laptop'\. Valid profiles: smoke, cpu, gpu"):
        load_settings()


def test_profiles_follow_the_design():
    assert PROFILES["smoke"].model_name == PROFILES["cpu"].model_name == PACKAGED_MINILM
    assert PROFILES["gpu"].model_revision == BERT_BASE_REVISION
    assert PROFILES["cpu"].train_pool_rows == 4000 and PROFILES["cpu"].test_rows is None
    assert PROFILES["gpu"].train_pool_rows is None
    assert all(p.max_length == 128 and p.validation_fraction == 0.2 for p in PROFILES.values())


def test_model_override_drops_the_pinned_revision(monkeypatch):
    monkeypatch.setenv("QLORA_MODEL", "prajjwal1/bert-tiny")
    chosen = load_settings("gpu")
    assert chosen.model_name == "prajjwal1/bert-tiny" and chosen.model_revision is None


def test_missing_data_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Point QLORA_DATA_DIR"):
        load_settings("smoke", data_dir=tmp_path / "nowhere")


def test_data_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_DATA_DIR", str(tmp_path))
    assert load_settings("smoke").data_dir == tmp_path.resolve()


def test_cpu_settings_use_fp32_and_plain_adamw():
    chosen = load_settings("cpu")
    assert chosen.compute_dtype == torch.float32 and chosen.optimizer == "adamw_torch"


def test_compute_dtype_follows_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert compute_dtype_for("cuda") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert compute_dtype_for("cuda") == torch.float16


def test_bf16_on_a_gpu_without_it_says_what_to_do(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "Tesla T4")
    with pytest.raises(ValueError, match=r"Tesla T4 does not support bfloat16\. Use torch\.float16"):
        compute_dtype_for("cuda", torch.bfloat16)


def test_half_precision_compute_on_cpu_is_refused():
    with pytest.raises(ValueError, match="Leave the compute dtype unset on a CPU"):
        compute_dtype_for("cpu", torch.float16)


def test_table_lists_every_setting():
    table = load_settings("smoke").table()
    for name in ("profile", "model", "data", "device", "compute dtype", "learning_rate", "max_length"):
        assert name in table
    assert "smoke" in table


def test_run_dir_is_per_profile(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_RUNS_DIR", str(tmp_path))
    assert load_settings("smoke").run_dir("qlora") == tmp_path.resolve() / "smoke" / "qlora"


def test_with_profile_changes_keeps_the_rest():
    chosen = load_settings("smoke")
    changed = with_profile_changes(chosen, learning_rate=1e-5)
    assert changed.profile.learning_rate == 1e-5
    assert changed.profile.batch_size == chosen.profile.batch_size and changed.device == chosen.device


def test_get_profile_returns_the_profile():
    assert get_profile("cpu") is PROFILES["cpu"]
    assert isinstance(load_settings("smoke").runs_dir, Path)
