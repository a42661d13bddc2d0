"""The GPU check: ``make gpu-check`` on a CUDA machine, in at most 8 minutes, with no model hub.

Four parts, one report (printed, and written as JSON with a Markdown twin):

1. notebooks 02, 03, 04, 05 and 07 on the ``smoke`` profile under nbval, on
   CUDA, with the packaged MiniLM: pass or fail and seconds, one pytest
   process per notebook;
2. a randomly initialised classifier of bert-base's shape (``BertConfig()``):
   seconds per training step and ``torch.cuda.max_memory_allocated`` for LoRA
   on a 16-bit base against QLoRA (NF4 + double quantization), both with paged
   AdamW, whose paged state ``max_memory_allocated`` does not see and the
   report adds; in fp16, and in bf16 where the GPU has it natively;
3. the CUDA kernel's NF4 codes and absmax for a few tensors against the
   from-scratch ``qlora_tutorial.quantization`` of notebook 01, so "bit-exact"
   can be said of the CUDA path too, or the difference is shown;
4. notebook 08's decoder recipe on a tiny random Llama with SmolLM2's
   tokenizer: QLoRA training through ``train_decoder`` (gradient
   checkpointing, paged AdamW, checkpoints), the shipped adapter reloaded onto
   a fresh 4-bit base, scored and asked to generate, and the 16-bit merge,
   saved and reloaded.

Without CUDA it refuses in one line and exits 2. It exits 1 when a notebook
or the decoder run fails; differences in part 3 and the 16-bit merge's score
differences in part 4 are findings, reported, not failures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path
from time import perf_counter
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = (
    "02_loading_in_4bit.ipynb",
    "03_lora_adapters.ipynb",
    "04_training.ipynb",
    "05_testing_and_inference.ipynb",
    "07_scaling_out.ipynb",
)
PARTS = ("notebooks", "training", "nf4", "decoder")
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "gpu_check.json"
DATA_CANDIDATES = (ROOT.parent / "shared" / "data" / "ag_news", ROOT / "shared" / "data" / "ag_news")
NF4_SHAPES = ((768, 768), (3072, 768), (7, 9))  # bert-base's attention and feed-forward, and an odd size
TAIL_CHARS = 2000
BUDGET_SECONDS = 450  # 7.5 minutes: a notebook that would start later is reported as not run
MIB = 2**20
NO_CUDA = (
    "gpu-check needs a CUDA GPU and torch sees none here (torch.cuda.is_available() is False): "
    "run it on a GPU machine, e.g. Colab with a T4, or use `make test` on a CPU."
)


class Refusal(Exception):
    """The check cannot run on this machine; the message says why, in one line (exit status 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line: where to write, which data, how many steps, which parts."""
    parser = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="the JSON report (a .md twin beside it)")
    parser.add_argument("--data-dir", type=Path, help="AG News folder (default: $QLORA_DATA_DIR, else ../shared)")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="the parts to run")
    parser.add_argument("--steps", type=int, default=20, help="timed training steps per configuration")
    parser.add_argument("--decoder-steps", type=int, default=6, help="training steps of the tiny decoder")
    parser.add_argument("--warmup", type=int, default=3, help="untimed training steps before them")
    parser.add_argument("--notebook-timeout", type=int, default=150, help="seconds allowed per notebook")
    parser.add_argument("--budget", type=int, default=BUDGET_SECONDS, help="seconds for the whole check")
    arguments = parser.parse_args(argv)
    numbers = (arguments.steps, arguments.decoder_steps, arguments.notebook_timeout, arguments.budget)
    if min(numbers) < 1 or arguments.warmup < 0:
        parser.error(
            "--steps, --decoder-steps, --notebook-timeout and --budget must be at least 1, --warmup at least 0"
        )
    return arguments


def require_cuda() -> None:
    """Refuse on a machine without CUDA."""
    if not torch.cuda.is_available():
        raise Refusal(NO_CUDA)


def find_data_dir(given: Path | None) -> Path:
    """The AG News folder: the argument, else ``QLORA_DATA_DIR``, else ``../shared/data/ag_news``; no Hub here."""
    configured = given or (Path(os.environ["QLORA_DATA_DIR"]) if os.environ.get("QLORA_DATA_DIR") else None)
    candidates = (configured,) if configured else DATA_CANDIDATES
    for folder in candidates:
        if (folder / "train.parquet").is_file() and (folder / "test.parquet").is_file():
            return folder.resolve()
    raise Refusal(
        f"gpu-check found no AG News folder (looked in {', '.join(str(c) for c in candidates)}): "
        "pass --data-dir or set QLORA_DATA_DIR to a folder with train.parquet and test.parquet."
    )


# --- part 1: the notebooks -----------------------------------------------------------------------------------------


def notebook_command(notebook: str) -> list[str]:
    """The pytest command that runs one notebook under nbval, as ``make test`` does."""
    path = ROOT / "notebooks" / notebook
    return [sys.executable, "-m", "pytest", str(path), "--nbval-lax", "-p", "no:cacheprovider", "-q"]


def notebook_environment(data_dir: Path, runs_dir: Path) -> dict[str, str]:
    """The smoke profile on the packaged MiniLM, the offline data, and one runs folder shared by the notebooks."""
    overrides = ("QLORA_MODEL", "QLORA_DECODER_MODEL")
    environment = {key: value for key, value in os.environ.items() if key not in overrides}
    smoke = {"QLORA_PROFILE": "smoke", "QLORA_DATA_DIR": str(data_dir), "QLORA_RUNS_DIR": str(runs_dir)}
    return {**environment, **smoke, "HF_HUB_OFFLINE": "1"}


def notebook_row(notebook: str, exit_status: int | None, seconds: float, output: str) -> dict[str, Any]:
    """One notebook's line of the report; ``exit_status`` None means it did not finish. A failure keeps its tail."""
    passed = exit_status == 0
    return {
        "notebook": notebook,
        "passed": passed,
        "exit_status": exit_status,
        "seconds": round(seconds, 1),
        "tail": "" if passed else output[-TAIL_CHARS:],
    }


def run_notebooks(data_dir: Path, timeout: int, deadline: float) -> list[dict[str, Any]]:
    """Each notebook in its own pytest process, in series order (05 reuses 04's adapter), until ``deadline``.

    A notebook never gets more than the time left before ``deadline`` (a ``perf_counter`` value).
    """
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-runs-") as runs_dir:
        environment = notebook_environment(data_dir, Path(runs_dir))
        for notebook in NOTEBOOKS:
            allowed = min(timeout, int(deadline - perf_counter()))
            if allowed < 1:
                rows.append(notebook_row(notebook, None, 0.0, "not run: the check's time budget was spent"))
                continue
            started = perf_counter()
            try:
                done = subprocess.run(
                    notebook_command(notebook),
                    cwd=ROOT,
                    env=environment,
                    capture_output=True,
                    text=True,
                    timeout=allowed,
                )
                exit_status, output = done.returncode, done.stdout + done.stderr
            except subprocess.TimeoutExpired as expired:
                exit_status, output = None, f"timed out after {allowed} s\n{expired.stdout or ''}"
            rows.append(notebook_row(notebook, exit_status, perf_counter() - started, str(output)))
            print(f"  {notebook}: {'passed' if rows[-1]['passed'] else 'FAILED'} in {rows[-1]['seconds']} s")
    return rows


# --- part 2: LoRA on a 16-bit base against QLoRA, bert-base-shaped --------------------------------------------------


def save_bert_base_shaped(folder: Path) -> Path:
    """A randomly initialised classifier of bert-base's shape (12 layers, 768 wide), saved as safetensors."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from qlora_tutorial.sources import packaged_minilm_dir

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(num_labels=4)).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(packaged_minilm_dir()).save_pretrained(folder)  # the same uncased vocabulary
    return folder


def training_configurations() -> list[tuple[str, str, torch.dtype]]:
    """(method, precision, compute dtype) to measure: fp16 always, bf16 only where the GPU has it natively."""
    from qlora_tutorial.settings import has_native_bf16

    dtypes = [torch.float16] + ([torch.bfloat16] if has_native_bf16() else [])
    return [
        (method, precision, dtype)
        for dtype in dtypes
        for method, precision in (
            ("LoRA (16-bit base)", "fp16" if dtype == torch.float16 else "bf16"),
            ("QLoRA", "nf4-dq"),
        )
    ]


def measure_training(
    model_dir: Path, method: str, precision: str, dtype: torch.dtype, steps: int, warmup: int
) -> dict[str, Any]:
    """Seconds per step (median) and peak CUDA memory of LoRA training at the gpu profile's batch (32 x 128 tokens).

    The model loads as the series loads it (``load_classifier``, ``attach_lora``),
    the trainable weights are fp32 as the Trainer's mixed precision needs them,
    and each step runs under autocast in ``dtype`` with paged AdamW (32-bit),
    with a gradient scaler for fp16, as the ``Trainer`` does with ``fp16=True``.
    """
    import bitsandbytes as bnb

    from qlora_tutorial.devices import to_model_device
    from qlora_tutorial.memory import paged_state_bytes
    from qlora_tutorial.modeling import attach_lora, load_classifier
    from qlora_tutorial.settings import load_settings

    settings = replace(load_settings("gpu", model=str(model_dir)), compute_dtype=dtype)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = attach_lora(load_classifier(settings, precision))
    trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
    for parameter in trainable:
        parameter.data = parameter.data.float()
    optimizer = bnb.optim.PagedAdamW32bit(trainable, lr=settings.profile.learning_rate)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (settings.profile.batch_size, settings.profile.max_length), generator=generator)
    labels = torch.randint(0, 4, (settings.profile.batch_size,), generator=generator)
    batch = to_model_device({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}, model)
    model.train()
    seconds = []
    for step in range(warmup + steps):
        torch.cuda.synchronize()
        started = perf_counter()
        with torch.autocast("cuda", dtype=dtype):
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= warmup:
            seconds.append(perf_counter() - started)
    allocated, paged = torch.cuda.max_memory_allocated(), paged_state_bytes(optimizer)
    del model, optimizer, batch
    gc.collect()
    torch.cuda.empty_cache()
    return training_row(method, precision, dtype, seconds, allocated, paged)


def training_row(
    method: str, precision: str, dtype: torch.dtype, seconds: list[float], allocated: int, paged: int
) -> dict[str, Any]:
    """One configuration's line of the report."""
    return {
        "method": method,
        "precision": precision,
        "compute_dtype": str(dtype).removeprefix("torch."),
        "steps": len(seconds),
        "seconds_per_step": round(statistics.median(seconds), 4),
        "seconds_per_step_spread": [round(min(seconds), 4), round(max(seconds), 4)],
        "max_memory_allocated_bytes": allocated,
        "paged_state_bytes": paged,
        "peak_bytes": allocated + paged,
    }


def run_training(steps: int, warmup: int) -> list[dict[str, Any]]:
    """Every configuration of ``training_configurations`` on one saved bert-base-shaped model."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-bert-") as folder:
        model_dir = save_bert_base_shaped(Path(folder))
        for method, precision, dtype in training_configurations():
            rows.append(measure_training(model_dir, method, precision, dtype, steps, warmup))
            row = rows[-1]
            print(
                f"  {method} {row['compute_dtype']}: {row['seconds_per_step']} s/step, "
                f"{row['peak_bytes'] / MIB:.0f} MiB"
            )
    return rows


# --- part 3: the CUDA kernel's NF4 against notebook 01's from-scratch code ------------------------------------------


def nf4_row(
    shape: tuple[int, ...],
    input_dtype: torch.dtype,
    mine_codes: torch.Tensor,
    cuda_codes: torch.Tensor,
    mine_absmax: torch.Tensor,
    cuda_absmax: torch.Tensor,
) -> dict[str, Any]:
    """How the CUDA kernel's codes and absmax compare with ours for one tensor (all on the CPU)."""
    differing = int((mine_codes != cuda_codes).sum())
    absmax_difference = (mine_absmax.float() - cuda_absmax.float()).abs().max().item()
    return {
        "shape": list(shape),
        "input_dtype": str(input_dtype).removeprefix("torch."),
        "codes": mine_codes.numel(),
        "codes_differing": differing,
        "absmax_equal": bool(torch.equal(mine_absmax.float(), cuda_absmax.float())),
        "absmax_max_abs_difference": absmax_difference,
        "bit_exact": differing == 0 and absmax_difference == 0.0,
    }


def run_nf4() -> list[dict[str, Any]]:
    """NF4 (block 64, no double quantization) of random tensors, in fp32 and in fp16 (the gpu profile's storage)."""
    import bitsandbytes.functional as bnbf

    from qlora_tutorial import quantization as q

    generator = torch.Generator().manual_seed(0)
    rows = []
    for shape in NF4_SHAPES:
        weight = torch.randn(shape, generator=generator) * 0.05
        for dtype in (torch.float32, torch.float16):
            given = weight.to(dtype)
            numel = given.numel()
            mine = q.quantize_4bit(given.float(), "nf4", block_size=64)
            packed, state = bnbf.quantize_4bit(given.cuda(), blocksize=64, quant_type="nf4")
            rows.append(
                nf4_row(
                    shape,
                    dtype,
                    q.unpack_4bit(mine.packed, numel),
                    q.unpack_4bit(packed.cpu(), numel),
                    mine.absmax,
                    state.absmax.cpu(),
                )
            )
    return rows


# --- part 4: notebook 08's decoder recipe, on a tiny random Llama --------------------------------------------------

PRECISION_OF_DTYPE = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
RELOAD_TOLERANCE = 1e-3  # the reloaded merge holds the same weights: only kernel-level differences are allowed


def save_tiny_decoder(folder: Path) -> Path:
    """A randomly initialised 2-layer, 64-wide Llama with SmolLM2's tokenizer and chat template, saved as safetensors.

    The tokenizer is read from the packaged GGUF file, so no hub is needed.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from qlora_tutorial.sources import packaged_smollm2_gguf

    gguf_path = packaged_smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,  # wide weights, so the scores differ from topic to topic
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def run_decoder(data_dir: Path, steps: int) -> dict[str, Any]:
    """Notebook 08's recipe on the `gpu` profile, with a tiny decoder: train, reload the adapter, merge in 16 bit.

    ``train_decoder`` trains QLoRA as ``python -m qlora_tutorial train-decoder``
    does (the profile's gradient checkpointing, paged AdamW, a checkpoint
    halfway); the shipped adapter is reloaded onto a fresh 4-bit base, which
    scores the test rows and generates; the merge into the dequantized base in
    the compute dtype is scored too, saved, and reloaded in that dtype.
    Without CUDA the same runs on the CPU, in fp32 (the tests do).
    """
    from qlora_tutorial.chat import prompts
    from qlora_tutorial.decoder import generate_answers, load_decoder, score_topics
    from qlora_tutorial.decoder_pipeline import checkpoints, decoder_splits, train_decoder
    from qlora_tutorial.decoder_profile import decoder_profile
    from qlora_tutorial.decoder_shipping import load_shipped_adapter, merge_decoder, merge_rounding
    from qlora_tutorial.inference import save_merged
    from qlora_tutorial.settings import load_settings

    settings = load_settings("gpu", data_dir=data_dir)
    with tempfile.TemporaryDirectory(prefix="gpu-check-decoder-") as folder:
        profile = decoder_profile(
            settings,
            model_name=str(save_tiny_decoder(Path(folder) / "model")),
            train_rows=64,
            steps=steps,
            batch_size=8,
            warmup_steps=1,
            save_steps=max(1, steps // 2),
            eval_rows=16,
            max_text_tokens=64,
        )
        adapter_dir, merged_dir = Path(folder) / "adapter", Path(folder) / "merged"
        results = train_decoder(settings, profile, adapter_dir)
        model, tokenizer = load_shipped_adapter(settings, profile, adapter_dir)
        asked = prompts(tokenizer, decoder_splits(settings, profile)["test"]["text"], profile.max_text_tokens)
        scores = {"adapter": score_topics(model, tokenizer, asked)}
        answers = generate_answers(model, tokenizer, asked[:2], max_new_tokens=4)
        rounding = merge_rounding(model, settings.compute_dtype)
        del model
        merged = merge_decoder(settings, profile, adapter_dir)
        merged_dtypes = sorted({str(parameter.dtype).removeprefix("torch.") for parameter in merged.parameters()})
        scores["merged"] = score_topics(merged, tokenizer, asked)
        save_merged(merged, tokenizer, merged_dir)
        del merged
        precision = PRECISION_OF_DTYPE[settings.compute_dtype]
        reloaded = load_decoder(settings, decoder_profile(settings, model_name=str(merged_dir)), precision)
        scores["reloaded"] = score_topics(reloaded, tokenizer, asked)
        left = len(checkpoints(adapter_dir))
    merge_dtype = str(settings.compute_dtype).removeprefix("torch.")
    return decoder_row(results, scores, answers, rounding.relative_error, merge_dtype, merged_dtypes, left, steps)


def decoder_row(
    results: dict[str, Any],
    scores: dict[str, np.ndarray],
    answers: list[str],
    rounding_error: float,
    merge_dtype: str,
    merged_dtypes: list[str],
    checkpoints_left: int,
    steps: int,
) -> dict[str, Any]:
    """The decoder run's report; ``scores``: the reloaded adapter's, the merge's and the reloaded merge's.

    It passed when every step trained, the finished run left no checkpoint,
    the merge is wholly in the compute dtype, its reload scores as it did, and
    the reloaded adapter generated. How far the 16-bit merge moved the scores
    is a finding.
    """
    adapter, merged, reloaded = scores["adapter"], scores["merged"], scores["reloaded"]
    reload_difference = float(np.abs(reloaded - merged).max())
    passed = (
        results["train_steps"] == steps
        and checkpoints_left == 0
        and merged_dtypes == [merge_dtype]
        and reload_difference <= RELOAD_TOLERANCE
        and len(answers) > 0
    )
    return {
        "train_steps": results["train_steps"],
        "gradient_checkpointing": results["gradient_checkpointing"],
        "train_seconds": round(results["train_seconds"], 2),
        "peak_bytes": results["peak_memory_bytes"],
        "checkpoints_left": checkpoints_left,
        "merge_dtype": merge_dtype,
        "merged_parameter_dtypes": merged_dtypes,
        "merge_rounding_relative_error": round(rounding_error, 4),
        "merged_vs_adapter_max_score_difference": round(float(np.abs(merged - adapter).max()), 4),
        "merged_vs_adapter_same_answers": int((merged.argmax(1) == adapter.argmax(1)).sum()),
        "rows": len(adapter),
        "reloaded_merge_max_score_difference": reload_difference,
        "generated": answers,
        "passed": bool(passed),
    }


def failed_decoder_row(error: Exception) -> dict[str, Any]:
    """The decoder run's report when it raised: the error's type and message, cut to the tail's length."""
    return {"passed": False, "error": f"{type(error).__name__}: {error}"[-TAIL_CHARS:]}


# --- the report -----------------------------------------------------------------------------------------------------


def device_summary() -> dict[str, Any]:
    """The GPU, its compute capability, the dtype rule's answer and the versions that matter."""
    from qlora_tutorial.settings import compute_dtype_reason

    major, minor = torch.cuda.get_device_capability()
    return {
        "name": torch.cuda.get_device_name(),
        "compute_capability": f"{major}.{minor}",
        "compute_dtype": compute_dtype_reason("cuda"),
        "cuda": torch.version.cuda,
        **{name: version(name) for name in ("torch", "transformers", "peft", "bitsandbytes")},
    }


def verdict(report: dict[str, Any]) -> str:
    """One line: whether every notebook passed, and whether the CUDA NF4 path is bit-exact with ours."""
    parts = []
    if "notebooks" in report:
        notebooks = report["notebooks"]
        failed = [row["notebook"] for row in notebooks if not row["passed"]]
        named = f" (failed: {', '.join(failed)})" if failed else ""
        parts.append(f"notebooks: {len(notebooks) - len(failed)} of {len(notebooks)} passed{named}")
    if "decoder" in report:
        parts.append("decoder recipe: " + ("passed" if report["decoder"]["passed"] else "FAILED"))
    nf4 = report.get("nf4", [])
    if nf4:
        exact = all(row["bit_exact"] for row in nf4)
        parts.append(
            "NF4 on CUDA: bit-exact with notebook 01" if exact else "NF4 on CUDA: differs from notebook 01 (table)"
        )
    return "; ".join(parts)


def yes_no(value: bool) -> str:
    """``yes`` or ``no``, for a table cell."""
    return "yes" if value else "no"


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: the device, then one table per part, then the verdict."""
    device = report["device"]
    lines = [
        "# GPU check",
        "",
        f"{device['name']}, compute capability {device['compute_capability']}, CUDA {device['cuda']}; "
        f"torch {device['torch']}, transformers {device['transformers']}, peft {device['peft']}, "
        f"bitsandbytes {device['bitsandbytes']}. Compute dtype: {device['compute_dtype']}.",
        f"Ran {report['started']}, {report['seconds']:.0f} s in all (`make gpu-check`).",
    ]
    if "notebooks" in report:
        lines += ["", "## Notebooks (smoke profile, nbval, packaged MiniLM)", "", "| notebook | result | seconds |"]
        lines += ["| --- | --- | ---: |"]
        lines += [
            f"| {r['notebook']} | {'passed' if r['passed'] else 'FAILED'} | {r['seconds']:.1f} |"
            for r in report["notebooks"]
        ]
    if "training" in report:
        lines += ["", "## Training step, bert-base-shaped classifier (batch 32 x 128 tokens, paged AdamW)", ""]
        lines += ["| method | precision | compute | s/step (median) | max allocated MiB | paged state MiB | peak MiB |"]
        lines += ["| --- | --- | --- | ---: | ---: | ---: | ---: |"]
        lines += [
            f"| {r['method']} | {r['precision']} | {r['compute_dtype']} | {r['seconds_per_step']:.4f} | "
            f"{r['max_memory_allocated_bytes'] / MIB:.0f} | {r['paged_state_bytes'] / MIB:.1f} | "
            f"{r['peak_bytes'] / MIB:.0f} |"
            for r in report["training"]
        ]
        lines += [f"\n{note}" for note in report.get("notes", [])]
    if "decoder" in report:
        lines += ["", "## Decoder recipe: tiny random Llama, QLoRA, adapter reloaded onto 4 bit, 16-bit merge", ""]
        lines += ["| measure | value |", "| --- | --- |"]
        lines += [f"| {key} | {value} |" for key, value in report["decoder"].items()]
    if "nf4" in report:
        lines += ["", "## NF4 on CUDA against notebook 01's from-scratch code (block size 64)", ""]
        lines += ["| shape | input | codes differing | absmax equal | max abs absmax difference | bit-exact |"]
        lines += ["| --- | --- | ---: | --- | ---: | --- |"]
        lines += [
            f"| {'x'.join(map(str, r['shape']))} | {r['input_dtype']} | {r['codes_differing']} of {r['codes']} | "
            f"{yes_no(r['absmax_equal'])} | {r['absmax_max_abs_difference']:.3g} | {yes_no(r['bit_exact'])} |"
            for r in report["nf4"]
        ]
    lines += ["", f"**{verdict(report)}**", ""]
    return "\n".join(lines)


def write_report(report: dict[str, Any], output: Path) -> tuple[Path, Path]:
    """Write the JSON report and its Markdown twin (same name, ``.md``); return both paths."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    twin = output.with_suffix(".md")
    twin.write_text(markdown(report))
    return output, twin


def exit_status(report: dict[str, Any]) -> int:
    """1 when a notebook or the decoder run failed, else 0."""
    rows = [*report.get("notebooks", []), *([report["decoder"]] if "decoder" in report else [])]
    return 0 if all(row["passed"] for row in rows) else 1


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen parts on this GPU and return the report."""
    require_cuda()
    needs_data = {"notebooks", "decoder"} & set(arguments.parts)
    data_dir = find_data_dir(arguments.data_dir) if needs_data else None
    started = perf_counter()
    report: dict[str, Any] = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_summary(),
    }
    if "nf4" in arguments.parts:
        print("NF4 codes on CUDA against notebook 01 ...", flush=True)
        report["nf4"] = run_nf4()
    if "training" in arguments.parts:
        print("training steps, bert-base-shaped ...", flush=True)
        report["training"] = run_training(arguments.steps, arguments.warmup)
        from qlora_tutorial.settings import has_native_bf16

        if not has_native_bf16():
            report["notes"] = ["bf16 not measured: " + report["device"]["compute_dtype"]]
    if "decoder" in arguments.parts:
        print("notebook 08's decoder recipe, tiny random Llama ...", flush=True)
        try:
            report["decoder"] = run_decoder(data_dir, arguments.decoder_steps)
        except Exception as error:  # reported with the rest, so the notebooks still run
            report["decoder"] = failed_decoder_row(error)
        print(f"  {verdict({'decoder': report['decoder']})}")
    if "notebooks" in arguments.parts:
        print("notebooks on the smoke profile under nbval ...", flush=True)
        report["notebooks"] = run_notebooks(data_dir, arguments.notebook_timeout, started + arguments.budget)
    report["seconds"] = round(perf_counter() - started, 1)
    return report


def main(argv: list[str] | None = None) -> int:
    """Parse, run, print and write the report; exit 2 with one line where it cannot run."""
    arguments = parse_args(argv)
    try:
        report = run(arguments)
    except Refusal as refusal:
        print(refusal, file=sys.stderr)
        return 2
    json_path, markdown_path = write_report(report, arguments.output)
    print("\n" + markdown(report))
    print(
        f"written: {json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path}, {markdown_path.name}"
    )
    return exit_status(report)


if __name__ == "__main__":
    sys.exit(main())
