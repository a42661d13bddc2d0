"""What notebook 09's ladder of model sizes runs on each profile: which shapes, how many steps, what margin.

The classifier's ``settings.Profile`` picks the profile; this adds what only
notebook 09 needs, as ``decoder_profile`` does for 08. The `smoke` profile runs
two tiny Llama shapes so that nbval covers every cell of 09 in CI in about a
minute; `cpu` runs the published shapes up to a 7B one on a 2-core, 24 GiB
machine, where each run is a few steps of batch 1 x 128 tokens (memory and
time per step do not depend on the number of steps, so a few are enough).
Which of those runs actually start is decided by the memory estimator, run by
run, against the memory this machine has free (``margin``).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import psutil

from qlora_tutorial.cpu_packing import cpu_lists_avx512_bf16
from qlora_tutorial.settings import Settings

GIB = 2**30


@dataclass(frozen=True)
class ScaleProfile:
    """Notebook 09's ladder and budget.

    ``shapes`` are ``shapes.DECODER_SHAPES`` names, smallest first.
    ``checkpointing_pair`` is the shape whose QLoRA run is repeated with
    gradient checkpointing off, to show what checkpointing buys.
    ``load_comparison_shape`` is the shape whose 4-bit checkpoint is loaded
    both ways (saved in 4 bit, and quantized while loading a 16-bit file).
    ``margin`` is the share of the available memory a predicted peak must
    leave free before a run is started.
    """

    shapes: tuple[str, ...]
    steps: int
    seq_len: int
    batch_size: int
    checkpointing_pair: str
    load_comparison_shape: str
    margin: float = 0.10
    lora_r: int = 16

    def table(self, settings: Settings) -> str:
        """What notebook 09 prints first: the profile, this machine's CPU and memory, then the ladder's settings.

        The classifier's model and budget (``settings.table``) play no part
        in 09, so they are not printed.
        """
        memory = psutil.virtual_memory()
        rows = [
            ("profile", f"{settings.profile.name} ({settings.profile.purpose})"),
            ("device", settings.device),
            ("CPU lists avx512_bf16", "yes" if cpu_lists_avx512_bf16() else "no"),
            ("memory", f"{memory.total / GIB:.1f} GiB, {memory.available / GIB:.1f} GiB available now"),
        ]
        rows += [(field.name, str(getattr(self, field.name))) for field in fields(self)]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


SCALE_PROFILES: dict[str, ScaleProfile] = {
    "smoke": ScaleProfile(
        shapes=("tiny-llama", "tiny-llama-wide"),
        steps=2,
        seq_len=32,
        batch_size=1,
        checkpointing_pair="tiny-llama",
        load_comparison_shape="tiny-llama-wide",
    ),
    "cpu": ScaleProfile(
        shapes=("smollm2-135m", "smollm2-360m", "smollm2-1.7b", "llama-2-7b"),
        steps=2,  # the second step is the one timed (the first sets up kernels and the optimizer state)
        seq_len=128,
        batch_size=1,
        checkpointing_pair="smollm2-360m",
        load_comparison_shape="smollm2-360m",
    ),
    "gpu": ScaleProfile(
        shapes=("smollm2-135m", "smollm2-360m", "smollm2-1.7b", "llama-2-7b"),
        steps=5,
        seq_len=512,
        batch_size=1,
        checkpointing_pair="smollm2-1.7b",
        load_comparison_shape="smollm2-1.7b",
    ),
}


def scale_profile(settings: Settings, **changes: object) -> ScaleProfile:
    """Notebook 09's ladder for the settings' profile, with single fields changed (e.g. ``steps=2``)."""
    return replace(SCALE_PROFILES[settings.profile.name], **changes)
