"""Command line of notebook 09: ``measure`` one training run in this process, and ask the estimator what ``fits``.

``python -m qlora_tutorial measure --shape llama-2-7b --method qlora --steps 2``
builds the shape's model for the method (``scale_runs``), trains it and
prints what it measured, after the estimator has checked that the predicted
peak fits in the memory this machine has available: a run that would not fit
is refused before any weight is allocated, with the numbers, instead of ending
in the kernel's out-of-memory killer. ``--json`` prints the results as one
JSON line (what ``scale_runs.measure_in_fresh_process`` reads).

``python -m qlora_tutorial fits --shape llama-3-8b --gpu T4 --seq-len 1024``
prints the estimator's prediction, part by part, and whether it fits that
GPU's usable memory (or, without ``--gpu``, this machine's available memory).

A mistake in the input (an unknown shape, method or GPU, a number out of
range) ends in one ``error: ...`` line on stderr and exit status 2, as the
other commands do.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import psutil

from qlora_tutorial.cli_types import fail, fraction, non_negative_int, positive_int
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import (
    DTYPE_BYTES,
    METHODS,
    GpuMemory,
    RunSpec,
    check_fits,
    estimate_peak,
    get_gpu,
    refuse_if_not_fits,
)
from qlora_tutorial.memory import format_bytes
from qlora_tutorial.settings import NATIVE_BF16_CAPABILITY, load_settings
from qlora_tutorial.shapes import get_decoder_shape

MEMORY_COMMANDS = ("measure", "fits")
DEFAULT_MARGIN = 0.10  # the share of the available memory a predicted peak must leave free


def available_bytes() -> int:
    """The memory this machine can give a new run now (``psutil.virtual_memory().available``)."""
    return psutil.virtual_memory().available


def add_run_options(command: argparse.ArgumentParser, *, method_default: str | None) -> None:
    """The options ``measure`` and ``fits`` share: which shape and method, and the batch's size."""
    command.add_argument("--shape", required=True, help="a published shape, e.g. llama-2-7b (see shapes.py)")
    command.add_argument(
        "--method",
        required=method_default is None,
        default=method_default,
        help=", ".join(METHODS) + (f" (default: {method_default})" if method_default else ""),
    )
    command.add_argument("--seq-len", type=positive_int, default=128, help="tokens per row (default: 128)")
    command.add_argument("--batch-size", type=positive_int, default=1, help="rows per step (default: 1)")
    command.add_argument("--lora-r", type=positive_int, default=16, help="LoRA rank (default: 16)")
    command.add_argument(
        "--no-gradient-checkpointing", action="store_true", help="keep every activation instead of recomputing"
    )
    command.add_argument(
        "--compute-dtype",
        choices=tuple(DTYPE_BYTES),
        help="qlora's compute dtype (default: bf16 where the CPU lists avx512_bf16, else fp32; on a GPU its own)",
    )


def add_memory_parsers(commands: argparse._SubParsersAction) -> None:
    """Add ``measure`` and ``fits`` to the command line's sub-commands."""
    measure = commands.add_parser(
        "measure", help="train a published shape a few steps with random weights and measure its memory (notebook 09)"
    )
    add_run_options(measure, method_default=None)
    measure.add_argument("--steps", type=non_negative_int, default=3, help="optimizer steps, 0: load only (default: 3)")
    measure.add_argument(
        "--quantize-while-loading",
        action="store_true",
        help="qlora: quantize the shape's bf16 checkpoint while loading it, instead of loading the saved 4-bit one",
    )
    measure.add_argument(
        "--margin",
        type=fraction,
        default=DEFAULT_MARGIN,
        help=f"share of the available memory to leave free (default: {DEFAULT_MARGIN})",
    )
    measure.add_argument(
        "--live-tensors", action="store_true", help="also record the live-tensor peak (torch.profiler: slower)"
    )
    measure.add_argument("--json", action="store_true", help="print the results as one JSON line")
    fits = commands.add_parser("fits", help="predict a run's peak memory and say whether it fits a GPU or this machine")
    add_run_options(fits, method_default="qlora")
    fits.add_argument("--gpu", help="a GPU name, e.g. T4 or A100-40GB (default: this machine's available memory)")
    fits.add_argument(
        "--margin",
        type=fraction,
        default=DEFAULT_MARGIN,
        help=f"share of the memory to leave free (default: {DEFAULT_MARGIN})",
    )


def run_spec(arguments: argparse.Namespace, *, device: str = "cpu", compute_dtype: str | None = None) -> RunSpec:
    """The ``estimator.RunSpec`` the options describe (``scale_runs.scale_spec``: QLoRA's CPU dtype rule).

    ``compute_dtype`` is the default where ``--compute-dtype`` is not given.
    """
    from qlora_tutorial.scale_runs import scale_spec  # torch and transformers: only for the commands that need them

    return scale_spec(
        get_decoder_shape(arguments.shape),
        arguments.method,
        compute_dtype=arguments.compute_dtype or compute_dtype,
        batch_size=arguments.batch_size,
        seq_len=arguments.seq_len,
        gradient_checkpointing=not arguments.no_gradient_checkpointing,
        lora_r=arguments.lora_r,
        device=device,
    )


def gpu_compute_dtype(gpu: GpuMemory, method: str) -> str | None:
    """The 16-bit dtype QLoRA and LoRA on a 16-bit base compute in on ``gpu``, as the `gpu` profile decides it.

    bf16 from compute capability 8.0 (``settings.NATIVE_BF16_CAPABILITY``),
    fp16 below (a T4); None for the methods that compute in fp32.
    """
    if method not in ("qlora", "lora-bf16"):
        return None
    return "bf16" if tuple(gpu.compute_capability) >= NATIVE_BF16_CAPABILITY else "fp16"


def measure_command(arguments: argparse.Namespace) -> int:
    """``measure``: refuse a run that would not fit, else run it here and print what it measured."""
    from qlora_tutorial.quantized_checkpoint import checkpoints_dir
    from qlora_tutorial.scale_runs import check_spec, measure_run

    spec = run_spec(arguments)
    check_spec(spec, arguments.steps, quantize_while_loading=arguments.quantize_while_loading)
    here = psutil.Process().memory_info().rss  # this process before any weight: the estimate's runtime part
    estimate = refuse_if_not_fits(spec, available_bytes(), arguments.margin, process_bytes=here)
    results = measure_run(
        spec,
        arguments.steps,
        checkpoints_dir(load_settings(device="cpu")),
        quantize_while_loading=arguments.quantize_while_loading,
        live_tensors=arguments.live_tensors,
    )
    results.update(predicted_bytes=estimate.total_bytes, predicted_parts=dict(estimate.parts))
    if arguments.json:
        print(json.dumps(results), flush=True)
        return 0
    print(run_summary(results))
    return 0


def run_summary(results: dict[str, Any]) -> str:
    """A measured run in three lines: what ran, its peak against the prediction, its times."""
    phase = results["train"] or results["load"]
    split = (
        f", {'training' if results['train'] else 'loading'} anon {format_bytes(phase['anon_bytes'])} "
        f"file {format_bytes(phase['file_bytes'])}"
        if phase["split_available"]
        else ""
    )
    lines = [
        f"{results['shape']}, {results['method']} ({results['compute_dtype']}, {results['base_source']}), "
        f"batch {results['batch_size']} x {results['seq_len']}, gradient checkpointing "
        f"{'on' if results['gradient_checkpointing'] else 'off'}, {results['steps']} steps",
        f"peak {format_bytes(results['peak_bytes'])}{split}; predicted {format_bytes(results['predicted_bytes'])}",
        f"load {results['load_seconds']:.1f} s",
    ]
    if results["median_step_seconds"] is not None:
        lines[-1] += f", {results['median_step_seconds']:.2f} s/step, {results['tokens_per_second']:.1f} tokens/s"
    return "\n".join(lines)


def fits_command(arguments: argparse.Namespace) -> int:
    """``fits``: print the prediction part by part and the verdict for a GPU or this machine."""
    if arguments.gpu:
        gpu = get_gpu(arguments.gpu)
        spec = run_spec(arguments, device="cuda", compute_dtype=gpu_compute_dtype(gpu, arguments.method))
        available, where = gpu.usable_bytes, f"a {gpu.name}"
    else:
        spec, available, where = run_spec(arguments), available_bytes(), "this machine"
    estimate = estimate_peak(spec)
    print(spec.describe())
    for part, count in estimate.parts.items():
        print(f"  {part:<12} {format_bytes(count):>10}")
    print(f"  {'total':<12} {format_bytes(estimate.total_bytes):>10}")
    print(check_fits(estimate, available, arguments.margin, where).message)
    return 0


def run_memory_command(arguments: argparse.Namespace) -> int:
    """Run ``measure`` or ``fits``; a mistake in the input, or a run that would not fit, prints one line and exits 2."""
    handler = measure_command if arguments.command == "measure" else fits_command
    try:
        return handler(arguments)
    except UserInputError as error:
        return fail(error)
