"""The "pip install and subclass" path: a training script with its own DSFTTrainer subclass.

`FormatTrackingTrainer` adds one metric to every evaluation: the share of eval prompts whose greedy reply follows the
`<sep>` format, i.e. reads as `{'thought': ..., 'hallucination': 'yes'|'no'}` with `delia.evaluation`'s parser (JSON or
`ast.literal_eval`, size-limited, never `eval`), the one `delia eval` uses. That is the quantity DELIA's downstream rows
teach, next to the per-source losses the trainer already logs. Generation goes through delia's own engine
(`delia.generation`), the same one `build_cache` and `delia eval` use. After training, `delia eval OUTPUT` measures
the run fully (accuracy, the follow / DO-NOT `<sep>` contrast, retained general ability).

    python examples/train_dsft.py                                   # tiny local model, bundled data, CPU, ~30 s
    python examples/train_dsft.py --model Qwen/Qwen2.5-0.5B-Instruct --cache my_cache.jsonl --ratio 100 --steps 400
"""

from __future__ import annotations

import argparse
import tempfile

from delia import (
    DSFTTrainer,
    add_new_tokens,
    build_cache,
    get_peft_config,
    get_training_arguments,
    setup_tokenizer_and_model,
)
from delia.demo import build_demo_model, demo_file
from delia.evaluation.metrics import read_answer
from delia.generation import SamplingConfig
from delia.generation.transformers_backend import TransformersBackend


def follows_format(reply: str) -> bool:
    """Whether a reply holds the `<sep>` dict ('thought' and 'hallucination' keys) with a yes/no judgement."""
    answer = read_answer(reply)
    return answer.in_format and answer.label is not None


class FormatTrackingTrainer(DSFTTrainer):
    """DSFTTrainer that also logs `eval_format_adherence` at every evaluation."""

    def __init__(self, *args, probe_rows: int = 8, probe_max_new_tokens: int = 64, **kwargs):
        super().__init__(*args, **kwargs)
        self.probe_rows, self.probe_max_new_tokens = probe_rows, probe_max_new_tokens
        self._format_adherence: float | None = None

    def format_adherence(self) -> float:
        """Greedy replies to the first `probe_rows` eval prompts; the share that follows the format."""
        prompts = self.eval_dataset.select(range(min(self.probe_rows, len(self.eval_dataset))))["prompt"]
        backend = TransformersBackend(self.model, self.processing_class, batch_size=self.probe_rows)
        greedy = SamplingConfig(max_new_tokens=self.probe_max_new_tokens, temperature=0.0)
        replies = backend.generate([list(prompt) for prompt in prompts], greedy)
        return sum(follows_format(reply.text) for reply in replies) / len(replies)

    def evaluate(self, *args, **kwargs):
        self._format_adherence = self.format_adherence()
        return super().evaluate(*args, **kwargs)

    def log(self, logs, start_time=None):
        if self._format_adherence is not None and "eval_loss" in logs:
            logs["eval_format_adherence"] = self._format_adherence
            self._format_adherence = None
        super().log(logs, start_time)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model folder or hub name; default: a tiny local model")
    parser.add_argument("--train", default=demo_file("downstream.jsonl"))
    parser.add_argument("--eval", default=demo_file("eval.jsonl"))
    parser.add_argument("--cache", default=None, help="diverse cache; default: self-sample one from bundled queries")
    parser.add_argument("--ratio", type=float, default=2.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="runs/train_dsft")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        model_path = options.model or build_demo_model(f"{scratch}/tiny", seed=0)
        tokenizer, model = setup_tokenizer_and_model(model_path, new_tokens=())  # loaded once, <sep> added below
        cache = options.cache
        if cache is None:  # the base model self-samples before <sep> exists
            cache = build_cache(
                model, demo_file("queries.jsonl"), f"{scratch}/cache.jsonl", max_new_tokens=32, tokenizer=tokenizer
            )
        add_new_tokens(tokenizer, model, ["<sep>"])
        args = get_training_arguments(
            options.output,
            1,
            2e-3,
            8,
            1,
            512,
            max_steps=options.steps,
            eval_steps=0.5,
            save_strategy="no",
            gradient_checkpointing=False,
            report_to="none",
        )
        trainer = FormatTrackingTrainer(
            model=model,
            args=args,
            train_dataset=options.train,
            eval_dataset=options.eval,
            diverse_dataset=cache,
            diverse_ratio=options.ratio,
            processing_class=tokenizer,
            peft_config=get_peft_config(r=8, lora_alpha=16),
        )
        trainer.train()
        trainer.save_model()
    for entry in trainer.state.log_history:
        if "eval_format_adherence" in entry:
            print(
                f"step {entry['step']}: eval_loss {entry['eval_loss']:.4f}, "
                f"format adherence {entry['eval_format_adherence']:.0%}"
            )


if __name__ == "__main__":
    main()
