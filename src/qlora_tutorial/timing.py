"""Seconds per optimizer step, measured inside the ``Trainer``.

Taught in notebook 06. Examples per second over a whole run mixes in the
evaluations, the first slow steps and whatever else the machine did. A callback
that times each optimizer step from its start to its end leaves evaluation out,
and the median over the steps after a warm-up, with its interquartile range
(``uncertainty.spread``), is a per-step cost two methods can be compared on.
"""

from __future__ import annotations

from time import perf_counter
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

WARMUP_STEPS = 5


class StepTimer(TrainerCallback):
    """Records the wall-clock seconds of every optimizer step (forward, backward, optimizer update)."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started: float | None = None

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Start the clock of one step."""
        self._started = perf_counter()

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        """Stop it; evaluation and logging run after this hook, so they are not counted."""
        if self._started is not None:
            self.seconds.append(perf_counter() - self._started)
            self._started = None


def after_warmup(seconds: list[float], warmup: int = WARMUP_STEPS) -> list[float]:
    """The step times without the first ``warmup`` steps (allocator and caches settling), when enough remain."""
    return seconds[warmup:] if len(seconds) > 2 * warmup else seconds
