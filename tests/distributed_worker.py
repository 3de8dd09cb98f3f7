"""One process of a tiny distributed DSFT run (launched by test_distributed.py with torchrun).

Writes what this process saw: a hash of the mixture's row order, the training logs, and an evaluation with tracked
tokens (rank 0 also scores the eval rows one at a time, in one process, as the reference).
"""

import hashlib
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))  # this checkout's delia, not whichever one is installed
from conftest import diverse_rows, downstream_rows  # noqa: E402

from delia import DSFTConfig, DSFTTrainer, add_new_tokens  # noqa: E402
from delia.runtime import leave_process_group  # noqa: E402
from delia.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


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


def main(output_dir: str) -> None:
    tokenizer = build_tiny_tokenizer("llama2")
    model = build_tiny_model(tokenizer)
    add_new_tokens(tokenizer, model, ["<sep>"])
    args = DSFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=2,
        max_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        per_device_eval_batch_size=2,  # 5 eval rows over 2 ranks: the last global batch repeats 3 rows
        track_tokens=["<sep>", "'"],
    )
    trainer = DSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(downstream_rows()),
        eval_dataset=Dataset.from_list(downstream_rows(5)),
        diverse_dataset=Dataset.from_list(diverse_rows()),
        diverse_ratio=1,
        processing_class=tokenizer,
    )
    order = mixture_hash(trainer.train_dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = trainer.evaluate()
    record = {"order": order, "logs": logs, "world_size": trainer.args.world_size, "eval": metrics}
    if trainer.args.process_index == 0:
        record["reference"] = token_loss_one_row_at_a_time(trainer, ["<sep>", "'"])
    Path(output_dir, f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()  # as `delia train` does: no rank hangs or aborts at exit
