"""`delia demo`: the whole method on bundled data, offline, on CPU, in about half a minute on a 2-core AMD EPYC.

1. Build a tiny Llama-architecture model and a BPE tokenizer trained on the bundled text (or load `--model`).
2. Self-sample a diverse cache: the model answers each bundled general query twice (`--samples_per_query`;
   `build_cache`, reference template), enough rows for the default ratio without drawing any twice.
3. Train with `DSFTTrainer` on the bundled `<sep>` hallucination-judgement rows mixed with the cache at `--ratio`,
   with `<sep>` added as a new token, evaluating on the bundled eval rows.
4. Write the run folder: the trained model and its tokenizer (base: `tiny-model/`), the diverse cache,
   `delia_mixture.json`, `log_history.json`, `loss.png` (per-source and eval loss against step, `delia plot`'s figure),
   `token_loss.jsonl` (`<sep>`'s eval loss), `summary.json`; print a summary table. `delia eval OUTPUT` and
   `delia probe OUTPUT/tiny-model OUTPUT` then measure it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

from .bundled import DEMO_FILES, demo_file
from .io import write_json_atomically
from .progress import Phase, Phases, label_training_bar
from .run_files import DIVERSE_CACHE_FILE, LOG_HISTORY_FILE, LOSS_PLOT_FILE, SUMMARY_FILE

if TYPE_CHECKING:
    from .trainer import DSFTTrainer

# torch, transformers and trl are imported inside the functions that need them, so that `delia demo --help` and a
# mistyped option are answered before they load (tests/test_fast_start.py).


def build_demo_model(folder: str, seed: int) -> str:
    """A tiny Llama model and a tokenizer trained on the bundled text, saved to `folder`."""
    from .tiny import build_tiny_tokenizer, save_tiny_model

    texts = []
    for name in DEMO_FILES:
        with open(demo_file(name), encoding="utf-8") as handle:
            texts += [message["content"] for line in handle for message in json.loads(line)["messages"]]
    tokenizer = build_tiny_tokenizer("llama2", vocab_size=1024, texts=texts)
    save_tiny_model(  # 2048 positions: a long bundled prompt and its reply fit (RoPE: the weights are the same)
        folder,
        tokenizer=tokenizer,
        tie_word_embeddings=False,
        hidden_size=96,
        num_hidden_layers=2,
        seed=seed,
        max_position_embeddings=2048,
    )
    return folder


def _first_last(log_history: list[dict[str, Any]], key: str) -> tuple[float, float]:
    values = [entry[key] for entry in log_history if key in entry]
    return (values[0], values[-1]) if values else (math.nan, math.nan)


#: The bundled general queries the demo self-samples.
QUERIES = 128
#: Seconds per unit of each phase of the tiny demo, measured on 2 busy cores: the phases' expected shares of the time.
TINY_SECONDS = {"model": 0.2, "reply": 0.015, "step": 0.09}


def demo_phases(model: str | None, steps: int, replies: int) -> Phases:
    """The tiny demo's phase headers (the model, self-sampling, training), with shares for these settings."""
    first = (
        f"loading {model}" if model else "building a tiny Llama model and a BPE tokenizer trained on the bundled text"
    )
    seconds = [TINY_SECONDS["model"], TINY_SECONDS["reply"] * replies, TINY_SECONDS["step"] * steps]
    share = [value / sum(seconds) for value in seconds]
    return Phases(
        [
            Phase("model", first, share[0]),
            Phase("self-sampling", f"self-sampling the diverse cache: {replies} replies", share[1]),
            Phase("training", f"training with DSFTTrainer for {steps} steps, with evals", share[2]),
        ],
        name="the demo",
    )


def build_demo_trainer(
    output: str,
    model: str | None,
    ratio: float,
    seed: int,
    steps: int,
    samples_per_query: int = 2,
    phases: Phases | None = None,
) -> DSFTTrainer:
    """Check the options, load the model, self-sample the cache and mix the data: what a bad input can fail.

    Kept apart from training, so that `main` reports these as bad input while a training error keeps its traceback.
    `samples_per_query` replies to each of the 128 bundled queries make a cache large enough for the default ratio;
    `phases` prints the headers and the time estimate.
    """
    from .build_cache import build_cache
    from .config import check_diverse_ratio, get_training_arguments
    from .lora import get_peft_config
    from .modeling import add_new_tokens, setup_tokenizer_and_model
    from .runtime import start_run_folder
    from .trainer import DSFTTrainer

    ratio = check_diverse_ratio(ratio)
    start_run_folder(output)
    phases = phases or demo_phases(model, steps, samples_per_query * QUERIES)
    phases.start("model")
    model_path = model or build_demo_model(os.path.join(output, "tiny-model"), seed)
    # Loaded once: it self-samples as the base model, then gets <sep> for training
    tokenizer, loaded = setup_tokenizer_and_model(
        model_path, quantization=None if model is None else "auto", new_tokens=()
    )
    cache = os.path.join(output, DIVERSE_CACHE_FILE)
    phases.start("self-sampling")
    build_cache(
        loaded,
        demo_file("queries.jsonl"),
        cache,
        max_new_tokens=48,
        batch_size=32,
        seed=seed,
        samples_per_query=samples_per_query,
        resume=False,
        overwrite=True,
        keep_degenerate=False,
        tokenizer=tokenizer,
        on_batch=partial(phases.first_batch, "self-sampling", unit="replies"),
    )
    add_new_tokens(tokenizer, loaded, ["<sep>"])
    args = get_training_arguments(
        output_dir=output,
        num_train_epochs=1,
        learning_rate=3e-3,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=1,
        max_seq_length=512,
        max_steps=steps,
        warmup_steps=5,
        eval_steps=0.125,
        save_strategy="no",
        gradient_checkpointing=False,
        bf16=False if model is None else None,  # bf16 does not pay on the tiny model; a real one gets the CPU default
        report_to="none",
        seed=seed,
        diverse_seed=seed,
        track_tokens=["<sep>"],
    )
    trainer = DSFTTrainer(
        model=loaded,
        args=args,
        train_dataset=demo_file("downstream.jsonl"),
        eval_dataset=demo_file("eval.jsonl"),
        diverse_dataset=cache,
        diverse_ratio=ratio,
        processing_class=tokenizer,
        peft_config=None if model is None else get_peft_config(),  # a real model (8-bit on CUDA) trains LoRA + <sep>
    )
    # a named bar with the loss, in place of one dict per step (the table at the end says it more briefly)
    label_training_bar(trainer, "training", partial(phases.first_batch, "training", unit="steps", what="training"))
    phases.start("training")
    return trainer


def finish_demo(trainer: DSFTTrainer, output: str, started: float) -> dict:
    """Train, then write the log history, the loss plot and the summary into `output`; return the summary."""
    from .evaluation.plots import plot_loss

    trainer.train()
    trainer.save_model()  # the trained model and its tokenizer, for `delia eval` and `delia probe`
    history = trainer.state.log_history
    write_json_atomically(os.path.join(output, LOG_HISTORY_FILE), history)
    plot_loss({os.path.basename(os.path.normpath(output)): history}, os.path.join(output, LOSS_PLOT_FILE))
    summary = {
        "rows": {source: stats["rows"] for source, stats in trainer.mixture["sources"].items()},
        "steps": trainer.state.global_step,
        "loss_downstream": _first_last(history, "loss_downstream"),
        "loss_diverse": _first_last(history, "loss_diverse"),
        "eval_loss": _first_last(history, "eval_loss"),
        "seconds": round(time.perf_counter() - started, 1),
        "output": output,
    }
    write_json_atomically(os.path.join(output, SUMMARY_FILE), summary)
    return summary


def run_demo(
    output: str = "runs/demo",
    model: str | None = None,
    ratio: float = 4.0,
    seed: int = 0,
    steps: int = 80,
    samples_per_query: int = 2,
) -> dict:
    """Run the demo into `output`; return the summary."""
    started = time.perf_counter()
    trainer = build_demo_trainer(output, model, ratio, seed, steps, samples_per_query)
    return finish_demo(trainer, output, started)


def print_summary(summary: dict) -> None:
    rows = summary["rows"]
    print(
        f"\nDELIA demo: {rows.get('downstream', 0)} downstream + {rows.get('diverse', 0)} diverse rows, "
        f"{summary['steps']} steps, {summary['seconds']} s"
    )
    print(f"{'':18}{'first':>10}{'last':>10}")
    for key in ("loss_downstream", "loss_diverse", "eval_loss"):
        first, last = summary[key]
        print(f"{key:18}{first:>10.4f}{last:>10.4f}")
    print(
        f"run folder: {summary['output']} (the trained model, loss.png, log_history.json, token_loss.jsonl, "
        "delia_mixture.json, diverse_cache.jsonl); measure it with `delia eval` on that folder"
    )


@dataclass
class DemoArguments:
    """`delia demo`'s options; unset ones take the chosen mode's defaults (the tiny model, or `--real`)."""

    real: bool = field(
        default=False,
        metadata={
            "help": "the method on SmolLM2-135M-Instruct: self-sample, plain SFT vs DELIA, evaluate, verdict "
            "(delia.real_demo); 6.5 min on a quiet 2-core AMD EPYC with native bf16, 14.8 min there with two other "
            "busy processes, longer without native bf16"
        },
    )
    model: str | None = field(
        default=None,
        metadata={"help": "a model folder, hub name or short name (smollm2-135m-instruct) instead of the tiny one"},
    )
    output: str | None = field(
        default=None, metadata={"help": "run folder (created; an existing delia run is reused); runs/demo[-real]"}
    )
    ratio: float | None = field(default=None, metadata={"help": "diverse rows per downstream row (4; --real: 2)"})
    seed: int = field(default=0)
    steps: int | None = field(default=None, metadata={"help": "optimizer steps (80; --real: 24 per run)"})
    learning_rate: float = field(default=1e-3, metadata={"help": "--real: LoRA learning rate"})
    samples_per_query: int = field(default=2, metadata={"help": "replies self-sampled per general query"})


def main(argv: list[str] | None = None) -> int:
    from .command_line import command_parser

    options = command_parser(DemoArguments, "delia demo", __doc__.splitlines()[0]).parse_args_into_dataclasses(argv)[0]
    if options.real:
        from .real_demo import main as real_main

        return real_main(options)
    options.output = options.output or "runs/demo"
    options.ratio = 4.0 if options.ratio is None else options.ratio
    options.steps = 80 if options.steps is None else options.steps
    from .upstream import quiet_upstream_noise

    started = time.perf_counter()
    with quiet_upstream_noise():  # upstream warnings that mean nothing to someone running the demo
        try:  # bad input: one clear line; a failure during training keeps its traceback
            trainer = build_demo_trainer(
                options.output, options.model, options.ratio, options.seed, options.steps, options.samples_per_query
            )
        except (ValueError, OSError) as error:
            print(f"delia demo: error: {error}", file=sys.stderr)
            return 2
        summary = finish_demo(trainer, options.output, started)
    print_summary(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
