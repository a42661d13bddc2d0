"""One measured training run of a published decoder shape: build it for a method, train a few steps, measure.

Taught in notebook 09, which runs each (shape, method) in a fresh process
(:func:`measure_in_fresh_process`, which starts ``python -m qlora_tutorial
measure``) so that every run starts from the same bare runtime and no run
inherits another's memory. The weights are random (memory and time do not
depend on their values), drawn straight at the method's dtype, or read from
the shape's saved 4-bit checkpoint for QLoRA (``quantized_checkpoint``).

The methods are the estimator's (``estimator.METHODS``): ``full`` (fp32
weights, every parameter trained), ``lora-fp32`` and ``lora-bf16`` (LoRA on a
frozen fp32 or bf16 base) and ``qlora`` (LoRA on the NF4 + double
quantization base, computing in the run's compute dtype). Each trains with
``torch.optim.AdamW`` on random tokens, LoRA at rank r and alpha 2r on all
seven linear kinds, with gradient checkpointing on or off. Loading and
training are measured apart (``process_memory.MemoryPhase``: anonymous and
file-backed pages, and the kernel's exact peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from contextlib import nullcontext
from functools import cache
from pathlib import Path
from statistics import median
from time import perf_counter
from typing import Any

import torch
from peft import LoraConfig
from transformers import LlamaForCausalLM, PreTrainedModel
from transformers.initialization import no_init_weights

from qlora_tutorial.cpu_packing import cpu_lists_avx512_bf16, keep_standard_layout
from qlora_tutorial.decoder import ALL_LINEAR_TARGETS
from qlora_tutorial.errors import UserInputError
from qlora_tutorial.estimator import RunSpec
from qlora_tutorial.memory import count_parameters, weight_memory
from qlora_tutorial.modeling import Precision, attach_lora
from qlora_tutorial.process_memory import LiveTensorPeak, MemoryPhase
from qlora_tutorial.quantized_checkpoint import built_record, ensure_random_checkpoint, load_quantizing, load_saved_4bit
from qlora_tutorial.shapes import DecoderShape

SEED = 42
LEARNING_RATE = 1e-4
LORA_DROPOUT = 0.05  # notebook 08's decoder profile
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# glibc serves blocks of 1 MiB and more with their own mapping, returned when freed: without it, glibc's dynamic
# threshold rises after the first large free and freed holes stay resident, so identical runs peak 0-50% apart.
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}
# What `python -m qlora_tutorial measure` has imported when it checks the estimate, and its resident set then
BASELINE_PROGRAM = (
    "import psutil, qlora_tutorial.__main__, qlora_tutorial.scale_runs; print(psutil.Process().memory_info().rss)"
)


def cpu_compute_dtype() -> str:
    """The compute dtype of QLoRA's 4-bit layers on this CPU: ``bf16`` where it lists ``avx512_bf16``, else ``fp32``.

    The same rule as the `gpu` profile's (``settings.compute_dtype_for``: bf16
    where the hardware computes it natively, from compute capability 8.0).
    A CPU with ``avx512_bf16`` (Intel Sapphire Rapids and later, AMD Zen 4 and
    later) multiplies bf16 matrices in hardware: faster than fp32, with half
    the bytes per dequantized weight and activation. Without it, PyTorch's
    CPU kernels convert bf16 to fp32 and back around every product, which
    costs time and saves little memory (the weights are 4-bit either way), so
    fp32 is the choice there. Notebook 09 runs both on a CPU that has it.
    """
    return "bf16" if cpu_lists_avx512_bf16() else "fp32"


@cache
def process_baseline_bytes() -> int:
    """The resident set of a fresh measuring process before it builds anything, measured once on this machine.

    The estimator's CPU ``runtime`` part starts from it
    (``estimator.estimate_peak(spec, process_bytes)``): the same imports take
    a different number of pages on another CPU, operating system or library
    build, and on a tiny shape this part is nearly the whole peak. The child
    has the measured runs' environment (``FIXED_MMAP_THRESHOLD``).
    """
    environment = {**os.environ, **FIXED_MMAP_THRESHOLD}
    command = [sys.executable, "-c", BASELINE_PROGRAM]
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if finished.returncode != 0:
        raise RuntimeError(f"Measuring a fresh process failed (exit {finished.returncode}):\n{finished.stderr}")
    return int(finished.stdout.split()[-1])


def scale_spec(shape: DecoderShape, method: str, *, compute_dtype: str | None = None, **fields: Any) -> RunSpec:
    """The ``estimator.RunSpec`` of a run here: QLoRA computes in :func:`cpu_compute_dtype` unless told otherwise.

    The other methods compute in their own dtype (fp32; bf16 for
    ``lora-bf16``), which ``RunSpec`` fills in and checks; ``fields`` are
    its other fields (``batch_size``, ``seq_len``, ``gradient_checkpointing``, ``lora_r``).
    """
    if compute_dtype is None and method == "qlora":
        compute_dtype = cpu_compute_dtype()
    return RunSpec(shape=shape, method=method, compute_dtype=compute_dtype, **fields)


def scale_lora_config(rank: int) -> LoraConfig:
    """LoRA at rank ``rank`` and alpha ``2 * rank`` on all seven linear kinds, ``CAUSAL_LM`` (as notebook 08's)."""
    return LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=LORA_DROPOUT,
        target_modules=list(ALL_LINEAR_TARGETS),
        task_type="CAUSAL_LM",
    )


def random_model(spec: RunSpec, dtype: torch.dtype) -> PreTrainedModel:
    """A model of ``spec.shape`` with seeded random weights at ``dtype``, on the CPU.

    Built with transformers' own initialisation switched off (``no_init_weights``:
    it would draw every weight twice, once by torch's layer defaults and once by
    ``_init_weights``, which costs a minute on a 7B shape), then drawn once as
    Llama's ``_init_weights`` draws them: every matrix from a normal with the
    config's ``initializer_range``, every norm weight 1. Drawing writes every
    page, so the weights are resident (anonymous memory) before training
    starts, as loaded weights would be. Tied embeddings stay tied.
    """
    config = spec.shape.llama_config()
    with no_init_weights():
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    torch.manual_seed(SEED)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.normal_(0.0, config.initializer_range)
            else:
                parameter.fill_(1.0)
    model.tie_weights()
    return model


def base_checkpoint(spec: RunSpec, checkpoints: Path, *, quantize_while_loading: bool = False) -> Path | None:
    """The checkpoint QLoRA's base is read from, built first (in its own process) if missing; None for the others.

    The saved 4-bit checkpoint, or with ``quantize_while_loading`` its bf16
    twin, which a ``BitsAndBytesConfig`` quantizes as it loads.
    """
    if spec.method != "qlora":
        return None
    source = Precision.BF16 if quantize_while_loading else Precision.NF4_DQ
    return ensure_random_checkpoint(spec.shape, checkpoints, source)[0]


def build_for_method(spec: RunSpec, checkpoint: Path | None = None) -> tuple[PreTrainedModel, dict[str, Any]]:
    """The model ``spec.method`` trains, and what its base is; adapters attached where the method has them.

    QLoRA loads ``checkpoint`` (:func:`base_checkpoint`): as saved if it is a
    4-bit one, quantizing while loading if it is a 16-bit one. The others draw
    random weights. Gradient checkpointing is switched on before the adapters
    go in, non-reentrant, so no input needs ``requires_grad``.
    """
    dtype = DTYPES[spec.compute_dtype]
    base: dict[str, Any] = {"base_source": "random", "checkpoint_bytes": None}
    if spec.method == "qlora":
        record = built_record(checkpoint) if checkpoint is not None else None
        if record is None:
            raise UserInputError(f"qlora loads its base from a built checkpoint, and {checkpoint} holds none.")
        saved = record["precision"] == Precision.NF4_DQ.value
        model = (load_saved_4bit if saved else load_quantizing)(checkpoint, dtype)
        base = {"base_source": f"{record['precision']} checkpoint", "checkpoint_bytes": record["file_bytes"]}
    else:
        model = random_model(spec, dtype)
    weights = weight_memory(model)
    base.update(base_weight_bytes=weights.total_bytes, base_quant_state_bytes=weights.quant_state_bytes)
    model.config.use_cache = False
    if spec.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if spec.method == "full":
        return model, base
    return attach_lora(model, scale_lora_config(spec.lora_r)), base


def train_steps(model: torch.nn.Module, spec: RunSpec, steps: int) -> list[float]:
    """Train ``steps`` AdamW steps on seeded random tokens (batch x sequence length); return each step's seconds."""
    model.train()
    keep_standard_layout(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    tokens = torch.Generator().manual_seed(SEED)
    seconds = []
    for _ in range(steps):
        batch = torch.randint(spec.shape.vocab, (spec.batch_size, spec.seq_len), generator=tokens)
        started = perf_counter()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(perf_counter() - started)
    return seconds


def check_spec(spec: RunSpec, steps: int, *, quantize_while_loading: bool = False) -> None:
    """Refuse what this runner cannot do: a device other than the CPU, negative steps, an unbuildable shape."""
    if spec.device != "cpu":
        raise UserInputError(f"Measured runs are on the CPU; device {spec.device!r} is estimated only.")
    if steps < 0:
        raise UserInputError(f"The number of steps cannot be negative, got {steps} (0 measures the load alone).")
    if quantize_while_loading and spec.method != "qlora":
        raise UserInputError(f"Quantizing while loading is a way to load qlora's base, not {spec.method}'s.")
    spec.shape.llama_config()  # raises for a shape that cannot be built (no heads, q/k/v biases)


def measure_run(
    spec: RunSpec, steps: int, checkpoints: Path, *, quantize_while_loading: bool = False, live_tensors: bool = False
) -> dict[str, Any]:
    """Build ``spec``'s model, train ``steps`` steps, and return what was measured, in this process.

    A missing checkpoint is built before the clock starts (``base_checkpoint``).
    ``load`` and ``train`` are the two phases' ``PhasePeak`` dicts (``train``
    is None for ``steps=0``, a load alone); ``peak_bytes`` is the larger
    ``VmHWM`` of the two (the process's peak resident set) and
    ``peak_anon_bytes`` the larger anonymous peak. ``median_step_seconds``
    leaves the first step out (it sets up kernels and allocates the optimizer
    state) when there is more than one. ``live_tensors`` adds
    ``live_tensor_peak_bytes`` (``LiveTensorPeak``: the profiler costs time
    and a few hundred MB, so the other numbers of such a run are not
    comparable with a plain run's).
    """
    check_spec(spec, steps, quantize_while_loading=quantize_while_loading)
    checkpoint = base_checkpoint(spec, checkpoints, quantize_while_loading=quantize_while_loading)
    train, seconds = None, []
    with LiveTensorPeak() if live_tensors else nullcontext() as tracker:
        started = perf_counter()
        with MemoryPhase() as load:
            model, base = build_for_method(spec, checkpoint)
        load_seconds = perf_counter() - started
        if steps:
            with MemoryPhase() as train:
                seconds = train_steps(model, spec, steps)
    phases = [load.peak] if train is None else [load.peak, train.peak]
    parameters = count_parameters(model)
    typical = median(seconds[1:] or seconds) if seconds else None
    return {
        "shape": spec.shape.name,
        "parameters": spec.shape.parameters,
        "method": spec.method,
        "compute_dtype": spec.compute_dtype,
        "gradient_checkpointing": spec.gradient_checkpointing,
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "lora_r": spec.lora_r,
        "steps": steps,
        **base,
        "load_seconds": load_seconds,
        "load": load.peak.as_dict(),
        "train": None if train is None else train.peak.as_dict(),
        "peak_bytes": max(phase.hwm_bytes for phase in phases),
        "peak_anon_bytes": max(phase.anon_bytes for phase in phases) if phases[0].split_available else None,
        "live_tensor_peak_bytes": tracker.peak_bytes if tracker is not None else None,
        "step_seconds": seconds,
        "median_step_seconds": typical,
        "tokens_per_second": spec.batch_size * spec.seq_len / typical if typical else None,
        "trainable_parameters": parameters.trainable,
        "total_parameters": parameters.total,
        "torch_threads": torch.get_num_threads(),
        "cpu_lists_avx512_bf16": cpu_lists_avx512_bf16(),
    }


def measure_command(
    spec: RunSpec,
    steps: int,
    *,
    quantize_while_loading: bool = False,
    live_tensors: bool = False,
    margin: float | None = None,
) -> list[str]:
    """The ``python -m qlora_tutorial measure`` command that runs ``spec`` for ``steps`` steps in a new process.

    ``margin`` is the share of the available memory the child's own check
    leaves free (None: the command's default), so that the caller and the
    child decide with the same margin.
    """
    command = [sys.executable, "-m", "qlora_tutorial", "measure", "--shape", spec.shape.name]
    command += ["--method", spec.method, "--steps", str(steps), "--seq-len", str(spec.seq_len)]
    command += ["--batch-size", str(spec.batch_size), "--lora-r", str(spec.lora_r)]
    command += ["--compute-dtype", spec.compute_dtype]
    if not spec.gradient_checkpointing:
        command.append("--no-gradient-checkpointing")
    if quantize_while_loading:
        command.append("--quantize-while-loading")
    if live_tensors:
        command.append("--live-tensors")
    if margin is not None:
        command += ["--margin", str(margin)]
    return [*command, "--json"]


def measure_in_fresh_process(
    spec: RunSpec,
    steps: int,
    *,
    quantize_while_loading: bool = False,
    live_tensors: bool = False,
    margin: float | None = None,
    log_path: Path | None = None,
) -> dict[str, Any]:
    """Run ``spec`` in a new Python process (:func:`measure_command`) and return its measurements.

    A run the estimator refuses (it would not fit in the memory available)
    raises ``UserInputError`` with the refusal's message, before the child
    allocated anything; any other failure raises with the end of the child's
    output. ``log_path``, if given, keeps the child's warnings and progress.
    The child runs with glibc's mmap threshold fixed at 1 MiB
    (``FIXED_MMAP_THRESHOLD``), so its peak is reproducible.
    """
    command = measure_command(
        spec, steps, quantize_while_loading=quantize_while_loading, live_tensors=live_tensors, margin=margin
    )
    environment = {**os.environ, **FIXED_MMAP_THRESHOLD}
    finished = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(finished.stderr)
    if finished.returncode == 0:
        for line in reversed(finished.stdout.splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    message = finished.stderr.strip().splitlines()
    last = message[-1] if message else ""
    if finished.returncode == 2 and last.startswith("error: "):
        raise UserInputError(last.removeprefix("error: "))
    tail = "\n".join(message[-15:])
    raise RuntimeError(f"{' '.join(command[2:8])} ... failed (exit {finished.returncode}):\n{tail}")
