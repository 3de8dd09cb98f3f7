"""`delia train`: the command-line counterpart of a DELIA training script.

Every `DSFTConfig` (so every `SFTConfig` / `TrainingArguments`) field is an option, next to the model options below;
`--config recipe.yaml` fills them from a YAML file and command-line options win (TRL's `TrlParser`). Works under
`accelerate launch -m delia.train ...` (or `accelerate launch $(which delia) train ...`).

    delia train --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --train_dataset train.jsonl \
        --diverse_dataset cache.jsonl --diverse_ratio 100 --output_dir runs/qwen
    delia train --config reproduce_checkpoint/recipe.yaml
    delia train --config recipe.yaml --resume      # after a pre-emption: on from the last complete checkpoint
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import yaml

from .command_line import command_parser, parse_with_recipe
from .config import DSFTConfig
from .integrity import find_checkpoint
from .io import read_json_or_none
from .lora import get_peft_config
from .modeling import resolve_quantization, setup_tokenizer_and_model
from .run_files import TRAINER_STATE_FILE
from .runtime import check_output_dir, leave_process_group, log_handler, start_run_folder
from .trainer import DSFTTrainer


@dataclass
class ModelArguments:
    """What to train and how the model is set up (training settings are DSFTConfig's)."""

    model_name_or_path: str = field(
        metadata={"help": "model folder, hub name or short name such as smollm2-135m-instruct (delia fetch-model)"}
    )
    train_dataset: str = field(metadata={"help": "downstream rows: JSONL path, saved dataset folder or hub name"})
    eval_dataset: str | None = field(default=None, metadata={"help": "eval rows, same forms"})
    quantization: str = field(default="auto", metadata={"help": "auto (8-bit on CUDA), 4bit, 8bit or none"})
    attn_implementation: str = field(default="auto", metadata={"help": "auto, sdpa, eager, flash_attention_2"})
    torch_dtype: str = field(default="auto", metadata={"help": "auto, bfloat16, float16 or float32"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank; 0 trains the whole model"})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    new_tokens: list[str] = field(default_factory=lambda: ["<sep>"], metadata={"help": "special tokens to add"})
    new_token_init: str = field(default="mean", metadata={"help": "mean or random"})
    resume: bool = field(
        default=False,
        metadata={
            "help": "resume from the last complete checkpoint in output_dir (none yet: start from the beginning)"
        },
    )


def build_trainer(model_args: ModelArguments, args: DSFTConfig) -> DSFTTrainer:
    """Check the options, load the model and mix the data: everything a bad input can fail, before any training."""
    check_output_dir(args.output_dir)
    if model_args.resume and args.resume_from_checkpoint:
        raise ValueError("pass --resume (the last checkpoint of --output_dir) or --resume_from_checkpoint, not both")
    for option, path in (
        ("--train_dataset", model_args.train_dataset),
        ("--eval_dataset", model_args.eval_dataset),
        ("--diverse_dataset", args.diverse_dataset),
    ):
        if path and path.endswith((".json", ".jsonl")) and not os.path.exists(path):
            raise FileNotFoundError(f"{option} {path!r} not found")
    quantization = resolve_quantization(model_args.quantization, torch.cuda.is_available())
    if model_args.lora_r == 0 and quantization is not None:
        raise ValueError(
            f"--lora_r 0 (full fine-tuning) cannot train a {quantization} model (--quantization "
            f"{model_args.quantization}); pass --quantization none, or --lora_r > 0"
        )
    start_run_folder(args.output_dir)
    tokenizer, model = setup_tokenizer_and_model(
        model_args.model_name_or_path,
        quantization=quantization,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.torch_dtype,
        new_tokens=tuple(model_args.new_tokens),
        new_token_init=model_args.new_token_init,
        trust_remote_code=args.trust_remote_code,
    )
    peft_config = None
    if model_args.lora_r > 0:
        peft_config = get_peft_config(
            r=model_args.lora_r,
            lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout,
            target_modules=model_args.lora_target_modules,
        )
    return DSFTTrainer(
        model=model,
        args=args,
        train_dataset=model_args.train_dataset,
        eval_dataset=model_args.eval_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def checkpoint_to_resume(model_args: ModelArguments, args: DSFTConfig, trainer: DSFTTrainer) -> str | None:
    """The checkpoint to resume from (`--resume`, or `--resume_from_checkpoint PATH`), checked against the mixture."""
    checkpoint = args.resume_from_checkpoint
    if model_args.resume:
        checkpoint = find_checkpoint(args.output_dir, allow_incomplete=args.allow_mixture_change)
        if checkpoint is None:
            if trainer.is_world_process_zero():
                print(f"delia train: no checkpoint in {args.output_dir} yet; training from the start", file=sys.stderr)
            return None
    return trainer.resolve_checkpoint(checkpoint)


def steps_done(checkpoint: str) -> int | None:
    """The optimizer steps a checkpoint holds (its trainer_state.json's global_step), or None if unreadable."""
    state = read_json_or_none(os.path.join(checkpoint, TRAINER_STATE_FILE))
    try:
        return int(state["global_step"])
    except (ValueError, KeyError, TypeError):
        return None


@contextmanager
def showing_delia_logs() -> Iterator[None]:
    """Print delia's INFO messages on stderr during the command: all of them on the main process, and on the others
    only warnings and the lines every process logs (its mixture fingerprint), so N processes do not repeat N times."""
    handler = log_handler()
    package_logger = logging.getLogger("delia")
    level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(level or logging.INFO)
    try:
        yield
    finally:
        package_logger.removeHandler(handler)
        package_logger.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    parser = command_parser((ModelArguments, DSFTConfig), "delia train", recipes=True)
    with showing_delia_logs():
        try:  # bad input: one clear line, nothing overwritten; a failure during training keeps its traceback
            model_args, args = parse_with_recipe(parser, argv)
            trainer = build_trainer(model_args, args)
            checkpoint = checkpoint_to_resume(model_args, args, trainer)
        except (ValueError, OSError, yaml.YAMLError) as error:
            print(f"delia train: error: {error}", file=sys.stderr)
            return 2
        done = steps_done(checkpoint) if checkpoint else None
        if done is not None and 0 < args.max_steps <= done:  # Trainer would train one more step past max_steps
            if trainer.is_world_process_zero():
                print(
                    f"delia train: {checkpoint} reached max_steps ({done}): nothing left to train; the trained weights "
                    "are in that folder",
                    file=sys.stderr,
                )
        else:
            trainer.train(resume_from_checkpoint=checkpoint)
            trainer.save_model()
        del trainer
        leave_process_group()  # a clean exit under torchrun / accelerate launch
        return 0


if __name__ == "__main__":
    sys.exit(main())
