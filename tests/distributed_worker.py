"""One process of a tiny DSFT run with LoRA and a trainable <sep>: launched by test_distributed.py with torchrun (2
processes, 2 rows each) and called in-process by the same test (1 process, 4 rows: the same global batch).

Writes what this process saw to `rank{N}.json`: a hash of the mixture's row order, the fingerprint, the training
logs, the files the trainer wrote, an evaluation with tracked tokens (rank 0 also scores the eval rows one at a time,
in one process, as the reference), and, when given a second cache that rank 1 alone reads, the error that stops it.
"""

import argparse
import hashlib
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # this checkout's delia, not an installed one
from conftest import downstream_rows  # noqa: E402

import delia.integrity  # noqa: E402
import delia.trainer  # noqa: E402
from delia import DSFTConfig, DSFTTrainer, add_new_tokens, get_peft_config  # noqa: E402
from delia.integrity import MixtureMismatchError  # noqa: E402
from delia.runtime import leave_process_group  # noqa: E402
from delia.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402

STEPS = 3
TRACKED = ["<sep>", "'"]


def mixture_hash(dataset: Dataset) -> str:
    return hashlib.sha256(json.dumps([list(dataset["prompt"]), list(dataset["source"])]).encode()).hexdigest()


def token_loss_one_row_at_a_time(trainer: DSFTTrainer, tokens: list[str]) -> dict[str, float]:
    """Mean NLL of each token wherever it is a target, from a full forward over each eval row alone."""
    model, tokenizer = trainer.model.eval(), trainer.processing_class
    ids = {tokenizer.convert_tokens_to_ids(token): token for token in tokens}
    sums = {token: [0.0, 0] for token in tokens}
    for row in trainer.eval_dataset:
        input_ids = torch.tensor([row["input_ids"]])
        with torch.no_grad():
            log_probs = torch.log_softmax(model(input_ids=input_ids).logits[0].double(), dim=-1)
        for t in range(1, input_ids.shape[1]):
            token = ids.get(int(input_ids[0, t]))
            if token is not None:
                sums[token][0] -= log_probs[t - 1, input_ids[0, t]].item()
                sums[token][1] += 1
    return {token: nll / count for token, (nll, count) in sums.items() if count}


@contextmanager
def recording_writes():
    """Note every file the trainer writes (its mixture record, the checkpoint records) in the list it yields."""
    written: list[str] = []
    write = delia.trainer.write_json_atomically

    def noted(path, payload):
        written.append(Path(path).name)
        write(path, payload)

    delia.trainer.write_json_atomically = delia.integrity.write_json_atomically = noted
    try:
        yield written
    finally:
        delia.trainer.write_json_atomically = delia.integrity.write_json_atomically = write


def config(output_dir: str, batch_size: int, **overrides) -> DSFTConfig:
    settings = dict(
        output_dir=output_dir,
        per_device_train_batch_size=batch_size,
        max_steps=STEPS,
        logging_steps=1,
        learning_rate=1e-2,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        bf16=False,  # float32: the runs are compared with a float32 reference (delia's CPU default is bf16 where native)
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return DSFTConfig(**{**settings, **overrides})


def run(output_dir: str, train: str, cache: str, batch_size: int, other_cache: str | None = None) -> dict:
    """Train STEPS steps and save the adapter; with `other_cache`, then build a second trainer that rank 1 feeds it."""
    tokenizer = build_tiny_tokenizer("llama2")
    model = build_tiny_model(tokenizer, tie_word_embeddings=False)
    add_new_tokens(tokenizer, model, ["<sep>"])
    with recording_writes() as written:
        trainer = DSFTTrainer(
            model=model,
            args=config(output_dir, batch_size, save_strategy="steps", save_steps=STEPS, track_tokens=TRACKED),
            train_dataset=train,
            eval_dataset=Dataset.from_list(downstream_rows(5)),
            diverse_dataset=cache,
            diverse_ratio=1,
            processing_class=tokenizer,
            peft_config=get_peft_config(r=4, lora_alpha=8, lora_dropout=0.0),  # no dropout: see test_distributed.py
        )
        order = mixture_hash(trainer.train_dataset)
        trainer.train()
    trainer.save_model(str(Path(output_dir, "adapter")))
    rank = trainer.args.process_index
    record = {
        "order": order,
        "fingerprint": trainer.mixture_fingerprint,
        "logs": [entry for entry in trainer.state.log_history if "loss" in entry],
        "world_size": trainer.args.world_size,
        "written": written,
        "eval": trainer.evaluate(),
    }
    if rank == 0:
        record["reference"] = token_loss_one_row_at_a_time(trainer, TRACKED)
    if other_cache is not None:
        tokenizer = build_tiny_tokenizer("llama2")
        try:
            DSFTTrainer(
                model=build_tiny_model(tokenizer),
                args=config(str(Path(output_dir, "mismatch")), batch_size),
                train_dataset=train,
                diverse_dataset=other_cache if rank == 1 else cache,
                diverse_ratio=1,
                processing_class=tokenizer,
            )
        except MixtureMismatchError as error:
            record["mismatch"] = str(error)
    Path(output_dir, f"rank{rank}.json").write_text(json.dumps(record))
    return record


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("output_dir", "train", "cache"):
        parser.add_argument(name)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--other-cache")
    options = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    logging.getLogger("delia").setLevel(logging.INFO)  # the fingerprint line of each rank
    run(options.output_dir, options.train, options.cache, options.batch_size, options.other_cache)
    leave_process_group()  # as `delia train` does: no rank hangs or aborts at exit
