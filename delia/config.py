"""`DSFTConfig`: TRL's `SFTConfig` plus the fields that say how the self-sampled diverse cache is mixed in."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from trl import SFTConfig

from .cpu import native_bf16
from .runtime import has_accelerator

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


def check_track_tokens(value: object) -> list[str | int] | None:
    """Return `value` as a list of token strings / ids (a lone string is one token), or raise a ValueError naming it."""
    if value is None or isinstance(value, str | int) and not isinstance(value, bool):
        return None if value is None else [value]  # type: ignore[list-item]
    if not isinstance(value, list | tuple) or not all(
        isinstance(token, str | int) and not isinstance(token, bool) and token != "" for token in value
    ):
        raise ValueError(f"track_tokens must be a list of token strings or ids, got {value!r}")
    return list(value) or None


@dataclass
class DSFTConfig(SFTConfig):
    r"""
    Configuration class for the [`DSFTTrainer`].

    Everything [`~trl.SFTConfig`] offers, plus the DELIA fields below. Like TRL's configs, it can be filled from the
    command line or a YAML file with [`~transformers.HfArgumentParser`] / `TrlParser`.

    Parameters:
        > Parameters that control the diverse mixture

        diverse_dataset (`str`, *optional*):
            The self-sampled diverse cache: a JSONL file (`build_cache` writes `{"messages": [user, assistant]}` rows;
            any form that matches the downstream rows' works), a folder saved with `Dataset.save_to_disk`, or a hub
            dataset name. `None` trains on the downstream rows alone, exactly as `SFTTrainer` would.
        diverse_ratio (`float`, *optional*, defaults to `100.0`):
            Diverse rows per downstream row: the mixture holds `round(diverse_ratio * len(train_dataset))` diverse rows
            (halves round up). `0` turns mixing off. The paper's `<sep>` checkpoint used `260`.
        diverse_sampling (`str`, *optional*, defaults to `"auto"`):
            How diverse rows are drawn from the cache. `"without_replacement"` needs a cache at least as large as the
            rows asked for. `"with_replacement"` draws every row independently. `"auto"` draws without replacement
            when the cache is large enough; otherwise it takes every cache row once and draws the remainder with
            replacement, with one warning that states the counts.
        diverse_seed (`int`, *optional*):
            Seed of the diverse draw and of the places the diverse rows take between the downstream rows (which keep
            their order). Defaults to `seed`. The same seed gives the
            same rows in the same order on every process and every run.

        final_reply_only (`bool`, *optional*, defaults to `True`):
            Conversational `messages` rows are split into prompt = every message but the last and completion = the
            final assistant reply, so the loss falls on that reply alone whatever the chat template (DELIA's recipe;
            works for templates without `{% generation %}` markers). This is the one way `DSFTTrainer` differs from
            `SFTTrainer`; `False` passes conversations on unchanged. Ignored when `assistant_only_loss=True`.

        > Parameters that control logging

        log_loss_per_source (`bool`, *optional*, defaults to `True`):
            Whether to log `loss_downstream` / `loss_diverse` (token-weighted mean NLL over each logging window) and
            `eval_loss_downstream` / `eval_loss_diverse`. Turned off, with a warning, under packing or padding-free
            training, which merge rows of both sources into one sequence.
        track_tokens (`list[str]`, *optional*):
            Tokens whose loss is logged at every evaluation, e.g. `["<sep>", "'"]`: the mean NLL of each token over every
            eval position where it is the next token, prompt or completion (`<sep>` sits in the prompt), padding
            excluded. Logged as `eval_token_loss/<token>` (no key for a token absent from the eval set) and appended
            to `output_dir/token_loss.jsonl`, one line per evaluation. A string must be a single token (a vocabulary
            entry, or text the tokenizer turns into one token); an int is a token id. No extra forward pass.

        > Parameters that control resuming

        allow_mixture_change (`bool`, *optional*, defaults to `False`):
            Resume from a checkpoint even if it was trained on another mixture. Each checkpoint folder records the
            mixture's fingerprint (a hash of the mixed rows in order, and the size and sha256 of the downstream file
            and the diverse cache) in `delia_checkpoint.json`; by default resuming after one of them changed, or from
            a checkpoint of another run, or from one without that record (a folder a kill left half-written) is
            refused with an error naming both fingerprints. `True` resumes anyway, with a warning.

        > Defaults on a CPU (no accelerator, or `use_cpu=True`), for fields left unset

        bf16 (`bool`, *optional*):
            With an accelerator, TRL's default (`True` unless `fp16`). On a CPU, `True` (bf16 autocast, float32 master
            weights) where the CPU computes in bf16 natively (AVX512-BF16 or AMX: about 2-3x faster matrix products),
            else `False`, since emulated bf16 is slower than float32. bf16 on a CPU sets `use_cpu=True`, which
            transformers requires for it. Losses move by bf16 rounding (0.1-1% on SmolLM2-135M over a few
            steps). On tiny models (hidden size ~100) the casts cost more than they save: set `bf16=False` there.
        gradient_checkpointing (`bool`, *optional*):
            With an accelerator, TRL's default (`True`). On a CPU, `False`: recomputing the forward pass costs 15-40% of
            a step (SmolLM2-135M), and the models a CPU trains keep their activations in memory easily. `DSFTTrainer` turns
            it back on, with a log line, when the longest batch's activations would not fit in half the available
            memory. `activation_checkpointing` is the same setting under its transformers 5 name.
        cpu_threads (`int`, *optional*):
            Intra-op torch threads while training on a CPU. `None`: the cores other programs leave free (1-minute
            load average), shared among the launch's processes on this machine, at most torch's own setting; on a
            shared machine a thread that loses its core stalls every op. `0` leaves torch's setting alone, as does
            `None` when `OMP_NUM_THREADS` is set. Ignored with an accelerator.
        Whatever these are, `DSFTTrainer` on a CPU projects only the positions that carry a label through the LM
        head (the same values; TRL projects every position there).

        > Deprecated names

        max_seq_length (`int`, *optional*):
            The original README's name of `max_length` (TRL's own name before 0.20): read as `max_length`, with one
            `FutureWarning`. Giving both with different values is an error.
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
        metadata={"help": "Seed of the diverse draw and of the diverse rows' places. Defaults to `seed`."},
    )
    final_reply_only: bool = field(
        default=True,
        metadata={"help": "Conversations: loss on the final assistant reply only (False: as SFTTrainer)."},
    )
    log_loss_per_source: bool = field(
        default=True,
        metadata={"help": "Log loss_downstream / loss_diverse and their eval counterparts."},
    )
    track_tokens: list[str] | None = field(
        default=None,
        metadata={"help": "Tokens whose eval loss is logged (eval_token_loss/<token>, token_loss.jsonl), e.g. <sep>."},
    )
    allow_mixture_change: bool = field(
        default=False,
        metadata={"help": "Resume from a checkpoint even if its mixture fingerprint differs from this run's."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={
            "help": "Recompute activations in the backward pass to save memory. Unset: on with an accelerator (TRL's "
            "default), off on a CPU while the activations fit in memory.",
            "nargs": "?",
            "const": True,
        },
    )
    cpu_threads: int | None = field(
        default=None,
        metadata={
            "help": "Torch threads while training on a CPU. Unset: the cores other programs leave free; 0: torch's "
            "own setting."
        },
    )
    max_seq_length: int | None = field(
        default=None,
        metadata={"help": "Deprecated: the original README's name of max_length (use max_length)."},
    )

    def __post_init__(self):
        self.check_delia_fields()
        self.take_max_seq_length()
        accelerator = has_accelerator()
        on_cpu = self.use_cpu or not accelerator
        #: The fields this config set to delia's CPU defaults because they were left unset (see the docstring).
        self.cpu_defaults: tuple[str, ...] = ()
        if self.bf16 is None and not self.fp16 and on_cpu:
            self.bf16 = native_bf16()  # TRL's bf16 default fails on a CPU-only machine, and emulated bf16 is slow
            self.cpu_defaults += ("bf16",)
        if self.bf16 and not accelerator:
            self.use_cpu = True  # transformers accepts bf16 without a GPU only with use_cpu
        if self.dataloader_pin_memory and not accelerator:
            self.dataloader_pin_memory = False  # pinning needs an accelerator; torch would warn on every dataloader
        if getattr(self, "activation_checkpointing", None) is None:
            if self.gradient_checkpointing is None:
                self.gradient_checkpointing = not on_cpu  # TRL's default with an accelerator
                if on_cpu:
                    self.cpu_defaults += ("gradient_checkpointing",)
            # transformers 5 renamed the field; setting only the old name would warn on every run
            self.activation_checkpointing = self.gradient_checkpointing
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or self.cpu_threads < 0):
            raise ValueError(f"cpu_threads must be None or an integer >= 0; got {self.cpu_threads!r}")
        super().__post_init__()

    def take_max_seq_length(self) -> None:
        """`max_seq_length` (the original README's name, TRL's before 0.20) is read as `max_length`, with one warning.

        Both given with different values is refused. Cleared once read, so a config rebuilt from `to_dict()` does not
        warn again.
        """
        if self.max_seq_length is None:
            return
        default = next(f.default for f in dataclasses.fields(SFTConfig) if f.name == "max_length")
        if self.max_length not in (default, self.max_seq_length):
            raise ValueError(
                f"max_seq_length={self.max_seq_length} and max_length={self.max_length} disagree; give max_length only "
                "(max_seq_length is its deprecated name)"
            )
        warnings.warn(
            "max_seq_length is deprecated: it is read as max_length, TRL's name for it; pass max_length instead",
            FutureWarning,
            stacklevel=4,  # the caller of DSFTConfig(...): past this method, __post_init__ and the dataclass __init__
        )
        self.max_length, self.max_seq_length = self.max_seq_length, None

    def check_delia_fields(self) -> None:
        """Validate and normalise the DELIA fields: the one place their values are checked."""
        self.diverse_ratio = check_diverse_ratio(self.diverse_ratio)
        self.diverse_sampling = check_diverse_sampling(self.diverse_sampling)
        if self.diverse_seed is None:
            self.diverse_seed = self.seed
        self.track_tokens = check_track_tokens(self.track_tokens)


def get_training_arguments(
    output_dir: str,
    num_train_epochs: float = 1,
    learning_rate: float = 2e-4,
    per_device_train_batch_size: int = 16,
    gradient_accumulation_steps: int = 4,
    max_seq_length: int | None = 1024,
    **overrides: Any,
) -> DSFTConfig:
    """A `DSFTConfig` with the original recipe; keyword `overrides` win.

    Logs every step, 25 warmup steps then a constant rate, weight decay 0.01, gradient checkpointing and half
    precision on CUDA (on a CPU both follow `DSFTConfig`'s CPU defaults). `max_seq_length` maps to TRL's `max_length`. The original evaluated every step, which costs as much
    as training on small batches; here evaluation runs 10 times per run (`eval_steps=0.1`) and `save_steps=100`.
    Pass `eval_strategy="no"` when there is no eval set.
    """
    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    settings: dict[str, Any] = {
        "output_dir": output_dir,
        "num_train_epochs": num_train_epochs,
        "learning_rate": learning_rate,
        "per_device_train_batch_size": per_device_train_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "max_length": max_seq_length,
        "logging_steps": 1,
        "eval_strategy": "steps",
        "eval_steps": 0.1,
        "save_steps": 100,
        "warmup_steps": 25,
        "lr_scheduler_type": "constant_with_warmup",
        "weight_decay": 0.01,
        "gradient_checkpointing": True if cuda else None,
        "bf16": bf16 if cuda else None,
        "fp16": cuda and not bf16,
    }
    settings.update(overrides)
    return DSFTConfig(**settings)
