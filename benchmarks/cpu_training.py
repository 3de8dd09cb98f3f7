"""
Training step time on a CPU: delia's CPU defaults against TRL's SFTTrainer defaults, on a real model, same rows.

The model is SmolLM2-135M-Instruct (`delia.models`: from the hub, or offline from the package index), set up as DELIA
trains it: `<sep>` added, LoRA r=16 on q/k/v/o with `<sep>`'s embedding rows trainable (`get_peft_config`). The rows
are the bundled `<sep>` judgements (reproduce_checkpoint/train_dataset.jsonl) mixed 1:1 with the bundled query cache
(reproduce_self_sample/query_cache.jsonl), so that the per-source loss path runs too; batches of 8 rows of ~100-200
tokens.

- TRL: `SFTTrainer` with `SFTConfig`'s defaults (gradient checkpointing on, torch's thread count), in float32: its
  bf16 default fails on a machine without a GPU (transformers refuses it without `use_cpu`), so `bf16=False`, the
  one change needed to run at all. It trains on the rows `DSFTTrainer` prepares (`delia.prepare_datasets`).
- delia: `DSFTTrainer` with `DSFTConfig`'s CPU defaults, none set by hand: bf16 autocast where the CPU has native
  bf16, no gradient checkpointing, threads the other programs leave free, the LM head on label positions only.

Both start from the same weights, see the same batches in the same order and take turns one optimizer step at a time
in one process (benchmarks/lockstep.py), so both see the same background load. The first --warmup steps are dropped;
the figure is the median TRL step over the median delia step. The losses of both at every step are printed: they
differ by bf16 rounding only (float32 when the CPU has no native bf16), and the run fails if the last ones differ by
more than --tolerance (relative).

    python benchmarks/cpu_training.py                      # 7 steps each, 2 of them warm-up
    python benchmarks/cpu_training.py --steps 10 --warmup 3
    python benchmarks/cpu_training.py --threads 2          # both on 2 threads: the gain without the thread choice
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from harness import BUNDLED_JUDGEMENTS, BUNDLED_QUERY_CACHE, announce_delia, quiet
from lockstep import check_same_rows, lockstep_timers, step_losses, train_in_lockstep, without_printer
from trl import SFTConfig, SFTTrainer

import delia
from delia import DSFTConfig, DSFTTrainer, get_peft_config, setup_tokenizer_and_model
from delia.cpu import free_threads, native_bf16
from delia.models import resolve_model
from delia.upstream import expose_trainable_token_lm_head_bias

ORDER = ("TRL", "delia")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="short name, folder or hub name")
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per trainer")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--ratio", type=float, default=1.0, help="diverse rows per downstream row")
    parser.add_argument("--threads", type=int, default=0, help="give both trainers this many threads (0: each its own)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="largest relative difference of the last losses")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    assert args.steps > args.warmup, "need more steps than warm-up steps"
    return args


def shared_settings(args: argparse.Namespace, output_dir: str) -> dict:
    """The training settings both trainers get; everything else is each one's default."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-4,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )


def build(name: str, args: argparse.Namespace, model_path: str, prepared, output_dir: str, timer):
    """TRL's SFTTrainer on the rows delia prepares, or DSFTTrainer with its CPU defaults; same model, same LoRA."""
    tokenizer, model = setup_tokenizer_and_model(model_path)
    peft_config = get_peft_config(model=model)
    if name == "TRL":
        trainer = SFTTrainer(
            model=model,
            args=SFTConfig(**shared_settings(args, output_dir), bf16=False),
            train_dataset=prepared.train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
        )
        expose_trainable_token_lm_head_bias(trainer.model)  # a fix, not a speed-up: else the fused LM head crashes
        return without_printer(trainer)
    config = DSFTConfig(**shared_settings(args, output_dir), diverse_ratio=args.ratio, cpu_threads=args.threads or None)
    print(f"delia's CPU defaults: {', '.join(f'{f}={getattr(config, f)}' for f in config.cpu_defaults)}")
    trainer = DSFTTrainer(
        model=model,
        args=config,
        train_dataset=str(BUNDLED_JUDGEMENTS),
        diverse_dataset=str(BUNDLED_QUERY_CACHE),
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )
    return without_printer(trainer)


def main(argv: list[str] | None = None) -> None:
    """TRL and delia trained side by side in lockstep; prints step times, losses, and `speedup=` last."""
    args = parse_arguments(argv)
    quiet()
    announce_delia()
    model_path = resolve_model(args.model)
    # the rows DSFTTrainer trains on
    prepared = delia.prepare_datasets(
        str(BUNDLED_JUDGEMENTS), str(BUNDLED_QUERY_CACHE), ratio=args.ratio, seed=args.seed
    )
    print(
        f"model {args.model} ({model_path}); {len(prepared.train_dataset)} rows; {args.steps} steps x batch "
        f"{args.batch_size}, first {args.warmup} dropped; native bf16: {native_bf16()}; torch threads "
        f"{torch.get_num_threads()} (delia would use {args.threads or free_threads()}); load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as workdir:
        baton, timers = lockstep_timers(ORDER, timeout=3600.0)
        trainers = {
            name: build(name, args, model_path, prepared, os.path.join(workdir, name), timers[name]) for name in ORDER
        }
        check_same_rows(trainers["TRL"], trainers["delia"], columns=("input_ids", "labels", "completion_mask"))
        # the thread count is per thread: TRL's thread gets --threads; DSFTTrainer sets its own from cpu_threads
        elapsed = train_in_lockstep(trainers, baton, threads={"TRL": args.threads} if args.threads else None)
    report(args, trainers, timers, elapsed)


def report(args: argparse.Namespace, trainers: dict, timers: dict, elapsed: float) -> None:
    """Step times and losses of both; fails when the last losses differ by more than --tolerance."""
    losses = {name: step_losses(trainers[name]) for name in ORDER}
    medians = {}
    for name in ORDER:
        medians[name] = statistics.median(timers[name].steps[args.warmup :])
        times = " ".join(f"{t:.1f}" for t in timers[name].steps)
        print(f"{name:<5} step times (s): {times}; median after warm-up {medians[name]:.2f} s")
    for name in ORDER:
        print(f"{name:<5} losses: {' '.join(f'{value:.4f}' for value in losses[name])}")
    last_trl, last_delia = losses["TRL"][-1], losses["delia"][-1]
    difference = abs(last_delia - last_trl) / abs(last_trl)
    print(
        f"final loss TRL {last_trl:.4f}, delia {last_delia:.4f}: relative difference {difference:.2e} "
        f"(tolerance {args.tolerance})"
    )
    print(f"both trained in {elapsed:.0f} s")
    if difference > args.tolerance:
        raise SystemExit(f"FAIL: the final losses differ by {difference:.2e}, more than {args.tolerance}")
    print(f"speedup={medians['TRL'] / medians['delia']:.2f}")


if __name__ == "__main__":
    main()
