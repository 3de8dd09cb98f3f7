"""Trainer helpers shared by the phases: step timing, a deadline that stops training, and the config they use."""

from __future__ import annotations

import math
import time
from typing import Any

from transformers import PrinterCallback, TrainerCallback

from .common import synchronize


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (on_step_begin to the next), with the device synchronized at each mark."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_step_begin(self, args, state, control, **kwargs):
        synchronize()
        self.marks.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs):
        synchronize()
        self.marks.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


class Deadline(TrainerCallback):
    """Stops training at the end of the step during which `deadline` (time.monotonic()) passes; says whether it did."""

    def __init__(self, deadline: float) -> None:
        self.deadline, self.stopped_at = deadline, None

    def on_step_end(self, args, state, control, **kwargs):
        if time.monotonic() >= self.deadline and self.stopped_at is None:
            self.stopped_at = state.global_step
            control.should_training_stop = True
        return control


DELIA_FIELDS = (
    "diverse_dataset",
    "diverse_ratio",
    "diverse_sampling",
    "diverse_seed",
    "final_reply_only",
    "log_loss_per_source",
    "track_tokens",
    "allow_mixture_change",
    "cpu_threads",
)


def config(output_dir: str, dry_run: bool, plain_sft: bool = False, **overrides: Any):
    """A DSFTConfig for the kit: no saving, no reporting, quiet; bf16 on the GPU, float32 on the dry run's tiny model.

    `plain_sft=True` gives TRL's SFTConfig with the same settings, less DELIA's fields (for the side-by-side runs).
    """
    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "logging_steps": 1,
        "eval_strategy": "no",
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
        "bf16": not dry_run,
        "gradient_checkpointing": False,
        "dataloader_num_workers": 0,
        "learning_rate": 2e-4,
    }
    settings.update(overrides)
    if plain_sft:
        from trl import SFTConfig

        return SFTConfig(**{key: value for key, value in settings.items() if key not in DELIA_FIELDS})
    from delia import DSFTConfig

    return DSFTConfig(**settings)


def quiet(trainer: Any) -> Any:
    """Drop the callback that prints every log dict (the report holds what matters)."""
    trainer.remove_callback(PrinterCallback)
    return trainer


def losses(trainer: Any, key: str = "loss") -> list[float]:
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def finite(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)
