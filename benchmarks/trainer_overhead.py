"""
Per-step overhead of DSFTTrainer over TRL's plain SFTTrainer, on the same rows, the same model and the same seed.

What is measured: the wall time of one optimizer step, taken from one `on_step_begin` callback to the next. That
interval holds everything the training loop does for a step: forward + backward (DSFTTrainer hooks the model to catch
the per-token log-probs and adds them to per-source sums), the optimizer step, logging (logging_steps=1; DSFTTrainer
adds loss_downstream / loss_diverse to every log) and fetching + collating the next batch (DSFTTrainer wraps the
collator to carry each row's `source`). The narrower `on_step_begin` -> `on_step_end` interval (forward, backward,
optimizer) is printed too.

Same work on both sides: synthetic conversational rows (a small downstream set and a larger diverse cache) are mixed
once with `delia.mix_datasets`, and SFTTrainer gets that mixed dataset (its `source` column is left in place; the
dataloader drops columns the model does not take). DSFTTrainer gets the downstream and diverse sets with the same
ratio and seed and builds the mixture itself. The script stops unless both prepared train datasets hold identical
input_ids in the same order, and unless both runs log the same loss at every step.

Alternation: the machine may be shared with other jobs, whose bursts of work last seconds, longer than a training
run's step. So each round builds both trainers (fresh models, same seed) and trains them in two threads that take
turns one optimizer step at a time (only one computes at any moment): step k of one trainer runs right after step k
of the other, on the same batch, and both see the same background load. Which trainer goes first flips each round.
The first --warmup steps of every run are dropped; the last line is the median DSFT step time over the median SFT
step time, pooled over all rounds. Per-round ratios scatter by several percent even with SFTTrainer in both slots
(plausibly as each round's fresh models land differently in memory), hence many short rounds: --aa runs exactly
that, SFT against SFT, to show the noise floor of the ratio on the machine at hand.

Threads: torch uses one intra-op thread by default here. On a 2-core machine shared with another job, two threads
made a step several times slower and far noisier in our runs (each op waits for the thread that lost its core);
--threads 0 restores torch's default.

    python benchmarks/trainer_overhead.py                  # 8 rounds of 25 steps x batch 8, tiny Llama 128 x 2
    python benchmarks/trainer_overhead.py --aa             # noise floor: SFT against SFT
    python benchmarks/trainer_overhead.py --hidden-size 256 --layers 4 --rounds 6
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
from pathlib import Path

import torch
from datasets import Dataset
from harness import announce_delia, conversation, quiet
from lockstep import check_same_rows, lockstep_timers, step_losses, train_in_lockstep, without_printer
from trl import SFTConfig, SFTTrainer

import delia
from delia import DSFTConfig, DSFTTrainer
from delia.tiny import TRAINING_TEXT, build_tiny_model, build_tiny_tokenizer


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--steps", type=int, default=25, help="optimizer steps per training run")
    parser.add_argument("--warmup", type=int, default=5, help="steps dropped at the start of every run")
    parser.add_argument("--rounds", type=int, default=8, help="rounds (the order flips every round)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hidden-size", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--downstream-rows", type=int, default=32)
    parser.add_argument("--cache-rows", type=int, default=2000, help="rows in the synthetic diverse cache")
    parser.add_argument(
        "--max-length", type=int, default=512, help="truncation length (the tiny model has 512 positions)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--aa", action="store_true", help="A/A calibration: the DSFT slot runs SFTTrainer too (ratio ~1)"
    )
    args = parser.parse_args(argv)
    assert args.steps > args.warmup + 1, "need more steps than warm-up steps"
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic rows: short downstream judgements and a diverse cache of varied lengths, built from the tokenizer's text

SENTENCES = [line.strip() for line in TRAINING_TEXT.splitlines() if line.strip()]


def downstream_rows(count: int) -> list[dict]:
    """`count` short `<sep>` judgements, each different."""
    return [
        conversation(
            f"'user_query' : what is {i} plus {i}?\n'chatgpt_response' : {2 * i + i % 2}\nFollow the <sep> format.",
            f"{{'thought': 'The sum is {2 * i}.', 'hallucination': '{'yes' if i % 2 else 'no'}'}}",
        )
        for i in range(count)
    ]


def diverse_rows(count: int, rng: random.Random) -> list[dict]:
    """`count` rows of 1-2 sentences asked and 1-5 answered: lengths vary, as in a real cache."""
    rows = []
    for _ in range(count):
        user = " ".join(rng.choices(SENTENCES, k=rng.randint(1, 2)))
        assistant = " ".join(rng.choices(SENTENCES, k=rng.randint(1, 5)))
        rows.append(conversation(user, assistant))
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Trainers


class Setup:
    """What every round builds its two trainers from: the settings, the tokenizer and the rows."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.tokenizer = build_tiny_tokenizer("llama2")
        self.downstream = Dataset.from_list(downstream_rows(args.downstream_rows))
        self.cache = Dataset.from_list(diverse_rows(args.cache_rows, random.Random(args.seed)))
        # enough mixed rows for every step to see a fresh batch: ratio x downstream + downstream >= steps x batch
        rows_needed = args.steps * args.batch_size
        self.ratio = max(1, -(-(rows_needed - args.downstream_rows) // args.downstream_rows))
        assert self.ratio * args.downstream_rows <= args.cache_rows, (
            "the cache is too small for that many steps; raise --cache-rows"
        )
        self.mixed = delia.mix_datasets(self.downstream, self.cache, ratio=self.ratio, seed=args.seed)

    def config_kwargs(self, output_dir: str) -> dict:
        """The training settings both trainers share."""
        return dict(
            output_dir=output_dir,
            per_device_train_batch_size=self.args.batch_size,
            max_steps=self.args.steps,
            max_length=self.args.max_length,
            logging_steps=1,
            learning_rate=1e-3,
            report_to="none",
            save_strategy="no",
            gradient_checkpointing=False,
            bf16=False,
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=self.args.seed,
        )

    def build_trainer(self, name: str, output_dir: str, timer):
        """A fresh model (same seed every time) in SFTTrainer (on the mixed rows) or DSFTTrainer (mixing itself)."""
        args = self.args
        model = build_tiny_model(
            self.tokenizer, hidden_size=args.hidden_size, num_hidden_layers=args.layers, seed=args.seed
        )
        if name == "SFT" or args.aa:
            config = SFTConfig(**self.config_kwargs(output_dir))
            trainer = SFTTrainer(
                model=model, args=config, train_dataset=self.mixed, processing_class=self.tokenizer, callbacks=[timer]
            )
        else:
            config = DSFTConfig(**self.config_kwargs(output_dir), diverse_ratio=self.ratio, log_loss_per_source=True)
            trainer = DSFTTrainer(
                model=model,
                args=config,
                train_dataset=self.downstream,
                diverse_dataset=self.cache,
                processing_class=self.tokenizer,
                callbacks=[timer],
            )
        return without_printer(trainer)


# ----------------------------------------------------------------------------------------------------------------------
# Rounds


class Tally:
    """Step times pooled over rounds (warm-up dropped), and the paired per-step ratios."""

    def __init__(self):
        self.steps: dict[str, list[float]] = {"SFT": [], "DSFT": []}  # whole steps
        self.computes: dict[str, list[float]] = {"SFT": [], "DSFT": []}  # on_step_begin -> on_step_end
        self.paired: list[float] = []  # DSFT step k / SFT step k, the two steps run back to back


def run_round(setup: Setup, round_index: int, workdir: str, tally: Tally, torch_threads: int) -> None:
    """Both trainers, built fresh, trained in lockstep; checks they follow the same loss curve; prints a line."""
    args = setup.args
    order = ("SFT", "DSFT") if round_index % 2 == 0 else ("DSFT", "SFT")
    baton, timers = lockstep_timers(order)
    trainers = {
        name: setup.build_trainer(name, str(Path(workdir, f"{name}-{round_index}")), timers[name]) for name in order
    }
    if round_index == 0:
        rows = check_same_rows(trainers["SFT"], trainers["DSFT"])
        print(f"check: both trainers prepared the same {rows} rows (identical input_ids, same order)")
    # the intra-op thread count is per thread: repeat the main thread's setting in each trainer's thread
    elapsed = train_in_lockstep(trainers, baton, threads=dict.fromkeys(order, torch_threads))

    # same rows, same initial weights, same seed: the two runs must follow the same loss curve step for step
    sft_losses, dsft_losses = step_losses(trainers["SFT"]), step_losses(trainers["DSFT"])
    worst = max((abs(a - b) for a, b in zip(sft_losses, dsft_losses, strict=True)), default=0.0)
    if len(sft_losses) != args.steps or worst > 1e-4:
        raise SystemExit(f"FAIL: the runs diverged: {len(sft_losses)} vs {len(dsft_losses)} losses, max diff {worst}")

    medians = {}
    for name in order:
        steps = timers[name].steps[args.warmup :]
        tally.steps[name] += steps
        tally.computes[name] += timers[name].computes[args.warmup :]
        medians[name] = statistics.median(steps)
    sft_steps, dsft_steps = timers["SFT"].steps[args.warmup :], timers["DSFT"].steps[args.warmup :]
    tally.paired += [d / s for s, d in zip(sft_steps, dsft_steps, strict=True)]
    print(
        f"round {round_index + 1}/{args.rounds} ({order[0]} first): median step SFT {1e3 * medians['SFT']:.2f} ms, "
        f"DSFT {1e3 * medians['DSFT']:.2f} ms, ratio {medians['DSFT'] / medians['SFT']:.3f}; "
        f"both {elapsed:.1f} s; losses identical (max diff {worst:.1e}, final {sft_losses[-1]:.4f})"
    )
    del trainers, timers
    gc.collect()  # free this round's trainers now (they hold reference cycles), not inside a timed step later


def main(argv: list[str] | None = None) -> None:
    """Rounds of SFT against DSFT in lockstep; prints per-round lines, the pooled medians, and `ratio=` last."""
    args = parse_arguments(argv)
    quiet(args.threads)
    announce_delia()
    setup = Setup(args)
    print(
        f"rows: {args.downstream_rows} downstream + {setup.ratio * args.downstream_rows} diverse (ratio {setup.ratio}) "
        f"= {len(setup.mixed)}; {args.steps} steps x batch {args.batch_size}; model hidden {args.hidden_size} x "
        f"{args.layers} layers; torch threads {torch.get_num_threads()}"
    )
    if args.aa:
        print("A/A calibration (--aa): the slot labelled DSFT runs SFTTrainer too, so the ratio shows the noise floor")

    tally = Tally()
    torch_threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as workdir:
        for round_index in range(args.rounds):
            run_round(setup, round_index, workdir, tally, torch_threads)

    sft, dsft = statistics.median(tally.steps["SFT"]), statistics.median(tally.steps["DSFT"])
    sft_compute, dsft_compute = statistics.median(tally.computes["SFT"]), statistics.median(tally.computes["DSFT"])
    for name, median, compute in (("SFT", sft, sft_compute), ("DSFT", dsft, dsft_compute)):
        steps = len(tally.steps[name])
        print(f"{name:<4} median step {1e3 * median:.2f} ms over {steps} steps (compute only {1e3 * compute:.2f} ms)")
    print(f"compute-only ratio (on_step_begin -> on_step_end): {dsft_compute / sft_compute:.3f}")
    print(f"median of paired per-step ratios (DSFT step k / SFT step k): {statistics.median(tally.paired):.3f}")
    print(f"ratio={dsft / sft:.3f}")


if __name__ == "__main__":
    main()
