"""`DSFTConfig`: TRL's `SFTConfig` plus the fields that say how the self-sampled diverse cache is mixed in."""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
from trl import SFTConfig

SAMPLING_MODES = ("auto", "without_replacement", "with_replacement")


def check_diverse_ratio(value: object) -> float:
    """Return `value` as a float, or raise a ValueError naming it unless it is a finite number >= 0."""
    try:
        ratio = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"diverse_ratio must be a finite number >= 0, got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(ratio) or ratio < 0:
        raise ValueError(f"diverse_ratio must be a finite number >= 0, got {value!r}")
    return ratio


def check_diverse_sampling(value: object) -> str:
    """Return `value` if it names a sampling mode, else raise a ValueError that lists the modes."""
    if value not in SAMPLING_MODES:
        raise ValueError(f"diverse_sampling must be one of {', '.join(SAMPLING_MODES)}; got {value!r}")
    return value  # type: ignore[return-value]


@dataclass
class DSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`DSFTTrainer`].

    Everything [`~trl.SFTConfig`] offers, plus the DELIA fields below. Like TRL's configs, it can be filled from the
    command line or a YAML file with [`~transformers.HfArgumentParser`] / `TrlParser`.

    Parameters:
        > Parameters that control the diverse mixture

        diverse_dataset (`str`, *optional*):
            The self-sampled diverse cache: a JSONL file of `{"messages": [user, assistant]}` rows (the format
            `build_cache` writes), a folder saved with `Dataset.save_to_disk`, or a hub dataset name. `None` trains on
            the downstream rows alone.
        diverse_ratio (`float`, *optional*, defaults to `100.0`):
            Diverse rows per downstream row: the mixture holds `round(diverse_ratio * len(train_dataset))` diverse rows
            (halves round up). `0` turns mixing off. The paper's `<sep>` checkpoint used `260`.
        diverse_sampling (`str`, *optional*, defaults to `"auto"`):
            How diverse rows are drawn from the cache. `"without_replacement"` needs a cache at least as large as the
            rows asked for. `"with_replacement"` draws every row independently. `"auto"` draws without replacement
            when the cache is large enough; otherwise it takes every cache row once and draws the remainder with
            replacement, with one warning that states the counts.
        diverse_seed (`int`, *optional*):
            Seed of the diverse draw and of the shuffle of the mixture. Defaults to `seed`. The same seed gives the
            same rows in the same order on every process and every run.

        > Parameters that control logging

        log_loss_per_source (`bool`, *optional*, defaults to `True`):
            Whether to log `loss_downstream` / `loss_diverse` (token-weighted mean NLL over each logging window) and
            `eval_loss_downstream` / `eval_loss_diverse`. Turned off, with a warning, under packing or padding-free
            training, which merge rows of both sources into one sequence.
    """

    diverse_dataset: str | None = field(
        default=None,
        metadata={"help": "Self-sampled diverse cache: JSONL path, saved dataset folder or hub dataset name."},
    )
    diverse_ratio: float = field(
        default=100.0,
        metadata={"help": "Diverse rows per downstream row (0 turns mixing off). The paper's checkpoint used 260."},
    )
    diverse_sampling: Literal["auto", "without_replacement", "with_replacement"] = field(
        default="auto",
        metadata={"help": "How diverse rows are drawn from the cache.", "choices": list(SAMPLING_MODES)},
    )
    diverse_seed: int | None = field(
        default=None,
        metadata={"help": "Seed of the diverse draw and the mixture shuffle. Defaults to `seed`."},
    )
    log_loss_per_source: bool = field(
        default=True,
        metadata={"help": "Log loss_downstream / loss_diverse and their eval counterparts."},
    )

    def __post_init__(self):
        self.diverse_ratio = check_diverse_ratio(self.diverse_ratio)
        self.diverse_sampling = check_diverse_sampling(self.diverse_sampling)
        if self.diverse_seed is None:
            self.diverse_seed = self.seed
        if self.bf16 is None and not self.fp16 and not has_accelerator():
            self.bf16 = False  # TRL defaults to bf16, which fails on a CPU-only machine; train in float32 there
        if self.dataloader_pin_memory and not has_accelerator():
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch would warn on every dataloader
        if getattr(self, "activation_checkpointing", False) is None and self.gradient_checkpointing is not None:
            # transformers 5 renamed the field; TRL still sets the old name's default, which would warn on every run
            self.activation_checkpointing = self.gradient_checkpointing
        super().__post_init__()


def has_accelerator() -> bool:
    """Whether torch sees a GPU or another accelerator."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def leave_process_group() -> None:
    """Destroy the default process group, if a launcher started one, so that every rank exits cleanly.

    Left to interpreter exit, a gloo worker thread still releasing a finished collective's tensors can abort
    the rank; destroyed straight after a collective, the group's destructor (which holds the GIL) can wait
    forever on that same thread (pytorch/pytorch#190489). So: free what still holds the group (DDP's reducer),
    let the worker threads finish, then destroy it, as `Accelerator.end_training` does.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()
    time.sleep(0.2)  # releases the GIL: gloo's threads finish destroying completed work
    torch.distributed.destroy_process_group()
