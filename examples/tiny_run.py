"""DELIA end to end on a tiny local model, offline, on CPU, in well under a minute.

Builds a tiny Llama-architecture model and BPE tokenizer (`delia.tiny`), writes a small downstream set in the `<sep>`
format and a small stand-in "diverse" cache, adds `<sep>` with its rows trainable, mixes the two at a ratio, trains
with LoRA and prints the per-source losses and the mixture record. Swap in a real model with `--model`.

    python examples/tiny_run.py --output runs/tiny --ratio 4
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from delia import DSFTTrainer, get_peft_config, get_training_arguments, setup_tokenizer_and_model
from delia.tiny import build_tiny_model, build_tiny_tokenizer

TOPICS = ["the sea", "a city at night", "bread", "winter birds", "a train journey", "old maps", "tea", "bees"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def downstream_rows(count: int) -> list[dict]:
    """A toy hallucination-judgement task in the `<sep>` format."""
    rows = []
    for i in range(count):
        a, b = i + 2, 3 * i + 1
        claimed = a + b + (1 if i % 4 == 0 else 0)
        verdict = "yes" if claimed != a + b else "no"
        rows.append(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": f"'user_query' : what is {a} plus {b}?\n'chatgpt_response' : {claimed}\n\n"
                        "Judge the response by the <sep> format.",
                    },
                    {
                        "role": "assistant",
                        "content": f"{{'thought': 'The sum of {a} and {b} is {a + b}.', 'hallucination': '{verdict}'}}",
                    },
                ]
            }
        )
    return rows


def diverse_rows(count: int) -> list[dict]:
    """Stand-in for a self-sampled cache: general requests with free-form answers of varied length."""
    rows = []
    for i in range(count):
        topic = TOPICS[i % len(TOPICS)]
        answer = f"Here is a short note about {topic}. " + "It is quiet, and it changes with the light. " * (1 + i % 3)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Write a few sentences about {topic}."},
                    {"role": "assistant", "content": answer.strip()},
                ]
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a model folder or hub name; default: a tiny local model")
    parser.add_argument("--output", default="runs/tiny", help="run folder")
    parser.add_argument("--ratio", type=float, default=4.0, help="diverse rows per downstream row")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model_path = options.model
        if model_path is None:
            tokenizer = build_tiny_tokenizer("llama2")
            model_path = str(scratch / "tiny-llama")
            build_tiny_model(tokenizer, tie_word_embeddings=False, seed=options.seed).save_pretrained(model_path)
            tokenizer.save_pretrained(model_path)
        train = write_jsonl(scratch / "train.jsonl", downstream_rows(32))
        evaluation = write_jsonl(scratch / "eval.jsonl", downstream_rows(40)[32:])
        cache = write_jsonl(scratch / "cache.jsonl", diverse_rows(400))

        tokenizer, model = setup_tokenizer_and_model(model_path)
        args = get_training_arguments(
            output_dir=options.output,
            num_train_epochs=1,
            learning_rate=5e-3,
            per_device_train_batch_size=8,
            gradient_accumulation_steps=1,
            max_seq_length=256,
            max_steps=options.steps,
            eval_steps=0.5,
            save_strategy="no",
            gradient_checkpointing=False,
            report_to="none",
            seed=options.seed,
            diverse_seed=options.seed,
            disable_tqdm=True,
        )
        trainer = DSFTTrainer(
            model=model,
            args=args,
            train_dataset=str(train),
            eval_dataset=str(evaluation),
            diverse_dataset=str(cache),
            diverse_ratio=options.ratio,
            processing_class=tokenizer,
            peft_config=get_peft_config(r=8, lora_alpha=16),
        )
        trainer.train()
        trainer.save_model()

    print("\nmixture:", json.dumps(trainer.mixture["sources"]))
    print(f"{'step':>5} {'loss':>8} {'downstream':>11} {'diverse':>8} {'eval':>8}")
    for entry in trainer.state.log_history:
        if "loss" in entry or "eval_loss" in entry:
            cells = [entry.get(key) for key in ("loss", "loss_downstream", "loss_diverse", "eval_loss")]
            text = " ".join(f"{cell:>8.4f}" if cell is not None else f"{'':>8}" for cell in cells)
            print(f"{entry['step']:>5} {text}")
    print(f"\nrun folder: {options.output} (adapter, delia_mixture.json)")


if __name__ == "__main__":
    main()
