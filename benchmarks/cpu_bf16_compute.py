"""QLoRA's classifier computing in bf16 against fp32 on this CPU: the step-time ratio, measured in one run.

Not run by CI: ``python benchmarks/cpu_bf16_compute.py [--steps 40]``. The
series computes in fp32 on every CPU (``settings.compute_dtype_for``), which
gives the same numbers on CPUs with and without ``avx512_bf16``. This measures
the option it did not take: the `cpu` profile's QLoRA (NF4 + double
quantization, LoRA r=8 on query and value) built twice from the same seed,
its 4-bit layers computing in fp32 in one and bf16 in the other, trained on
the same batches with steps interleaved (one step of each in turn, so that a
busy moment of the machine slows both). It prints the median of the per-step
ratios and both runs' losses. On a CPU without ``avx512_bf16`` bf16 is
emulated; the script says which kind it ran on.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import replace
from time import perf_counter

import torch
from transformers.utils import logging as hf_logging

from qlora_tutorial.cpu_packing import cpu_lists_avx512_bf16
from qlora_tutorial.data import load_splits, make_collator, tokenize_splits
from qlora_tutorial.modeling import attach_lora, load_classifier, load_tokenizer
from qlora_tutorial.settings import load_settings

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def main(argv: list[str] | None = None) -> int:
    """Train both compute dtypes ``--steps`` interleaved steps on the same batches; print times and losses."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per compute dtype (default: 40)")
    arguments = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    settings = load_settings("cpu")
    profile = settings.profile
    tokenizer = load_tokenizer(settings)
    train = tokenize_splits(load_splits(settings), tokenizer, profile.max_length)["train"]
    collate = make_collator(tokenizer)
    rows = train.shuffle(seed=profile.seed).select(range(arguments.steps * profile.batch_size))
    batches = [
        collate([rows[i] for i in range(start, start + profile.batch_size)])
        for start in range(0, len(rows), profile.batch_size)
    ]
    models, optimizers = {}, {}
    for name, dtype in DTYPES.items():
        model = attach_lora(load_classifier(replace(settings, compute_dtype=dtype), "nf4-dq"))
        model.train()
        models[name] = model
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizers[name] = torch.optim.AdamW(trained, lr=profile.learning_rate, weight_decay=profile.weight_decay)
    seconds: dict[str, list[float]] = {name: [] for name in DTYPES}
    losses: dict[str, list[float]] = {name: [] for name in DTYPES}
    for batch in batches:
        for name, model in models.items():
            started = perf_counter()
            loss = model(**batch).loss
            loss.backward()
            optimizers[name].step()
            optimizers[name].zero_grad(set_to_none=True)
            seconds[name].append(perf_counter() - started)
            losses[name].append(loss.item())
    ratios = [bf16 / fp32 for fp32, bf16 in zip(seconds["fp32"][1:], seconds["bf16"][1:], strict=True)]
    kind = "with" if cpu_lists_avx512_bf16() else "without (bf16 emulated)"
    print(
        f"CPU {kind} avx512_bf16, {torch.get_num_threads()} torch threads, {arguments.steps} steps of batch "
        f"{profile.batch_size}, the first left out of the times"
    )
    for name in DTYPES:
        last = statistics.mean(losses[name][-10:])
        print(
            f"{name} compute: median step {statistics.median(seconds[name][1:]):.3f} s, mean loss of the last 10 "
            f"steps {last:.3f}"
        )
    print(f"bf16 / fp32 step time, median of the per-step ratios: {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
