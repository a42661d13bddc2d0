import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import fake_cuda

from qlora_tutorial import settings as settings_module
from qlora_tutorial.errors import MissingInputError, UserInputError
from qlora_tutorial.settings import (
    PROFILES,
    changed_profile_fields,
    compute_dtype_for,
    compute_dtype_reason,
    get_profile,
    load_settings,
    with_profile_changes,
)
from qlora_tutorial.sources import BERT_BASE_REVISION

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_default_profile_is_cpu_without_cuda(without_cuda):
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


def test_model_override_drops_the_pinned_revision(monkeypatch):
    assert load_settings("gpu").model_revision == BERT_BASE_REVISION
    monkeypatch.setenv("QLORA_MODEL", "prajjwal1/bert-tiny")
    chosen = load_settings("gpu")
    assert chosen.model_name == "prajjwal1/bert-tiny" and chosen.model_revision is None


def test_model_argument_wins_over_the_environment_and_takes_a_revision(monkeypatch, tiny_bert_dir):
    monkeypatch.setenv("QLORA_MODEL", "prajjwal1/bert-tiny")
    chosen = load_settings("smoke", model=str(tiny_bert_dir), revision="abc123")
    assert (chosen.model_name, chosen.model_revision) == (str(tiny_bert_dir), "abc123")


def test_a_model_path_that_does_not_exist_is_refused_before_anything_loads(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_MODEL", str(tmp_path / "no" / "model"))
    with pytest.raises(MissingInputError, match=r"QLORA_MODEL=.*model is neither an existing folder nor a Hub"):
        load_settings("smoke")
    with pytest.raises(MissingInputError, match=r"^model=\./typo is neither"):
        load_settings("smoke", model="./typo")


def test_a_model_folder_without_config_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_MODEL", str(tmp_path))
    with pytest.raises(UserInputError, match=r"folder without config\.json, so it holds no model"):
        load_settings("smoke")


def test_missing_data_folder_says_what_to_do(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist\. Point QLORA_DATA_DIR"):
        load_settings("smoke", data_dir=tmp_path / "nowhere")


def test_a_data_file_in_place_of_the_folder_says_so(tmp_path):
    (tmp_path / "train.parquet").touch()
    with pytest.raises(UserInputError, match=r"is a file, not a folder"):
        load_settings("smoke", data_dir=tmp_path / "train.parquet")


def test_data_folder_from_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("QLORA_DATA_DIR", str(tmp_path))
    assert load_settings("smoke").data_dir == tmp_path.resolve()


def test_cpu_settings_use_fp32_and_plain_adamw(without_cuda):
    chosen = load_settings("cpu")
    assert chosen.device == "cpu"
    assert chosen.compute_dtype == torch.float32 and chosen.optimizer == "adamw_torch"


def test_gpu_settings_use_bf16_and_paged_adamw_on_an_a100(fake_a100):
    chosen = load_settings()
    assert (chosen.profile.name, chosen.device) == ("gpu", "cuda")
    assert chosen.compute_dtype == torch.bfloat16 and chosen.optimizer == "paged_adamw_32bit"


def test_a_t4_gets_fp16_and_paged_adamw(fake_t4):
    """torch.cuda.is_bf16_supported() says True on a T4 (emulation counts by default): the settings must not ask it."""
    assert torch.cuda.is_bf16_supported() and not torch.cuda.is_bf16_supported(including_emulation=False)
    chosen = load_settings()
    assert (chosen.profile.name, chosen.device) == ("gpu", "cuda")
    assert chosen.compute_dtype == torch.float16 and chosen.optimizer == "paged_adamw_32bit"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [
        ((7, 0), torch.float16),
        ((7, 5), torch.float16),
        ((8, 0), torch.bfloat16),
        ((8, 9), torch.bfloat16),
        ((9, 0), torch.bfloat16),
    ],
)
def test_compute_dtype_follows_the_compute_capability(monkeypatch, capability, expected):
    fake_cuda(monkeypatch, "some GPU", capability)
    assert compute_dtype_for("cuda") == expected


def test_bf16_on_a_t4_says_what_to_do(fake_t4):
    with pytest.raises(UserInputError, match=r"Tesla T4 does not support bfloat16\. Use torch\.float16"):
        compute_dtype_for("cuda", torch.bfloat16)
    assert compute_dtype_for("cuda", torch.float16) == torch.float16


def test_bf16_on_an_a100_is_granted(fake_a100):
    assert compute_dtype_for("cuda", torch.bfloat16) == torch.bfloat16


def test_the_dtype_reason_names_the_capability(fake_t4):
    assert compute_dtype_reason("cuda") == (
        "float16: compute capability 7.5 has no native bf16 (it needs 8.0; below, bf16 is emulated)"
    )
    assert compute_dtype_reason("cpu").startswith("float32")


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


def test_runs_are_saved_at_the_repository_root_from_any_working_folder(monkeypatch):
    monkeypatch.delenv("QLORA_RUNS_DIR")
    found = set()
    for folder in (REPO, REPO / "notebooks"):  # where `make run` and Jupyter work
        monkeypatch.chdir(folder)
        found.add(load_settings("smoke").runs_dir)
    assert found == {REPO / "runs"}
    assert re.search(r"^runs saved in +runs$", load_settings("smoke").table(), re.MULTILINE), "shown relative"


def test_an_installed_package_saves_runs_in_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("QLORA_RUNS_DIR")
    monkeypatch.setattr(settings_module, "source_checkout", lambda: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert load_settings("smoke").runs_dir == tmp_path.resolve() / "qlora-tutorial" / "runs"


def test_with_profile_changes_keeps_the_rest():
    chosen = load_settings("smoke")
    changed = with_profile_changes(chosen, learning_rate=1e-5)
    assert changed.profile.learning_rate == 1e-5
    assert changed.profile.batch_size == chosen.profile.batch_size and changed.device == chosen.device


def test_changed_profile_fields_are_exactly_the_changes():
    chosen = load_settings("smoke")
    assert changed_profile_fields(chosen.profile) == {}
    changed = with_profile_changes(chosen, learning_rate=1e-5, test_rows=None, purpose="a note")
    assert changed_profile_fields(changed.profile) == {"learning_rate": 1e-5, "test_rows": None}


def test_get_profile_returns_the_profile():
    assert get_profile("cpu") is PROFILES["cpu"]
    assert isinstance(load_settings("smoke").runs_dir, Path)


def test_a_gpu_machine_can_ask_for_cpu_settings(fake_t4):
    chosen = load_settings("cpu", device="cpu")
    assert (chosen.device, chosen.compute_dtype, chosen.optimizer) == ("cpu", torch.float32, "adamw_torch")
    assert load_settings("cpu", device="cuda").compute_dtype == torch.float16


def test_a_device_this_machine_lacks_is_refused(without_cuda):
    with pytest.raises(UserInputError, match=r"CUDA is not available here\. Use device='cpu'"):
        load_settings("smoke", device="cuda")
    with pytest.raises(UserInputError, match=r"Unknown device 'gpu'\. Use 'cpu' or 'cuda'"):
        load_settings("smoke", device="gpu")


def test_the_data_line_says_where_the_data_comes_from_in_words_not_a_machine_path(tmp_path):
    local = dict(load_settings("smoke", data_dir=tmp_path).rows())["data"]
    hub = dict(replace(load_settings("smoke", data_dir=tmp_path), data_dir=None).rows())["data"]
    assert local == "a local copy of fancyzhx/ag_news (the folder --data-dir or QLORA_DATA_DIR names)"
    assert hub == "the Hugging Face Hub (fancyzhx/ag_news)"
