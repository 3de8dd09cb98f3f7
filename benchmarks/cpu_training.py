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
import logging
import os
import statistics
import tempfile
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import transformers  # noqa: E402
from lockstep import Baton, LockstepTimer  # noqa: E402  (benchmarks/lockstep.py)
from transformers import PrinterCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

import delia  # noqa: E402
from delia import DSFTConfig, DSFTTrainer, get_peft_config, setup_tokenizer_and_model  # noqa: E402
from delia.cpu import free_threads, native_bf16  # noqa: E402
from delia.models import resolve_model  # noqa: E402
from delia.upstream import expose_trainable_token_lm_head_bias  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--model", default="smollm2-135m-instruct", help="short name, folder or hub name")
parser.add_argument("--steps", type=int, default=7, help="optimizer steps per trainer")
parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--ratio", type=float, default=1.0, help="diverse rows per downstream row")
parser.add_argument("--threads", type=int, default=0, help="give both trainers this many threads (0: each its own)")
parser.add_argument("--tolerance", type=float, default=0.02, help="largest relative difference of the last losses")
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()
assert args.steps > args.warmup, "need more steps than warm-up steps"

transformers.logging.set_verbosity_error()
logging.getLogger("delia").setLevel(logging.WARNING)
warnings.filterwarnings("ignore")

model_path = resolve_model(args.model)
downstream = str(ROOT / "reproduce_checkpoint" / "train_dataset.jsonl")
cache = str(ROOT / "reproduce_self_sample" / "query_cache.jsonl")
prepared = delia.prepare_datasets(downstream, cache, ratio=args.ratio, seed=args.seed)  # the rows DSFTTrainer trains on
print(
    f"model {args.model} ({model_path}); {len(prepared.train_dataset)} rows; {args.steps} steps x batch "
    f"{args.batch_size}, first {args.warmup} dropped; native bf16: {native_bf16()}; torch threads {torch.get_num_threads()}"
    f" (delia would use {args.threads or free_threads()}); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
)


def common(output_dir: str) -> dict:
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


def build(name: str, output_dir: str, timer: LockstepTimer):
    tokenizer, model = setup_tokenizer_and_model(model_path)
    peft_config = get_peft_config(model=model)
    if name == "TRL":
        config = SFTConfig(**common(output_dir), bf16=False)
        trainer = SFTTrainer(
            model=model,
            args=config,
            train_dataset=prepared.train_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[timer],
        )
        expose_trainable_token_lm_head_bias(trainer.model)  # a fix, not a speed-up: else the fused LM head crashes
        return trainer
    config = DSFTConfig(**common(output_dir), diverse_ratio=args.ratio, cpu_threads=args.threads or None)
    print(f"delia's CPU defaults: {', '.join(f'{f}={getattr(config, f)}' for f in config.cpu_defaults)}")
    return DSFTTrainer(
        model=model,
        args=config,
        train_dataset=downstream,
        diverse_dataset=cache,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[timer],
    )


def train_in_thread(name: str, trainer, baton: Baton, results: dict) -> None:
    if name == "TRL" and args.threads:
        torch.set_num_threads(args.threads)  # the thread count is per thread
    try:
        results[name] = trainer.train()
    except BaseException as error:  # hand the error to the main thread, and release the other trainer
        results[name] = error
        baton.fail(f"{name}: {type(error).__name__}: {error}")


def check_same_rows(trl_trainer, delia_trainer) -> None:
    """Both trainers must train on the same tokens with the same labels, in the same order."""
    trl_rows, delia_rows = trl_trainer.train_dataset, delia_trainer.train_dataset
    for column in ("input_ids", "labels", "completion_mask"):
        if column not in trl_rows.column_names and column not in delia_rows.column_names:
            continue
        if column not in trl_rows.column_names or trl_rows[column][:] != delia_rows[column][:]:
            raise SystemExit(f"FAIL: the prepared rows differ in {column}")


with tempfile.TemporaryDirectory() as workdir:
    order = ("TRL", "delia")
    baton = Baton(order, timeout=3600.0)
    timers = {name: LockstepTimer(name, baton) for name in order}
    trainers = {name: build(name, os.path.join(workdir, name), timers[name]) for name in order}
    for trainer in trainers.values():
        trainer.remove_callback(PrinterCallback)
    check_same_rows(trainers["TRL"], trainers["delia"])
    results: dict = {}
    threads = [threading.Thread(target=train_in_thread, args=(n, trainers[n], baton, results)) for n in order]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, result in results.items():
        if isinstance(result, BaseException):
            raise SystemExit(f"FAIL: {name} training raised {type(result).__name__}: {result}") from result

losses = {name: [e["loss"] for e in trainers[name].state.log_history if "loss" in e] for name in order}
medians = {}
for name in order:
    steps = timers[name].steps[args.warmup :]
    medians[name] = statistics.median(steps)
    print(
        f"{name:<5} step times (s): {' '.join(f'{t:.1f}' for t in timers[name].steps)}; median after warm-up {medians[name]:.2f} s"
    )
for name in order:
    print(f"{name:<5} losses: {' '.join(f'{value:.4f}' for value in losses[name])}")
last_trl, last_delia = losses["TRL"][-1], losses["delia"][-1]
difference = abs(last_delia - last_trl) / abs(last_trl)
print(
    f"final loss TRL {last_trl:.4f}, delia {last_delia:.4f}: relative difference {difference:.2e} (tolerance {args.tolerance})"
)
print(f"both trained in {time.perf_counter() - started:.0f} s")
if difference > args.tolerance:
    raise SystemExit(f"FAIL: the final losses differ by {difference:.2e}, more than {args.tolerance}")
print(f"speedup={medians['TRL'] / medians['delia']:.2f}")
