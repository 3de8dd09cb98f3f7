"""One process of a tiny distributed DSFT run (launched by test_distributed.py with torchrun).

Writes what this process saw: a hash of the mixture's row order and the training logs.
"""

import hashlib
import json
import sys
from pathlib import Path

from datasets import Dataset

sys.path.insert(0, str(Path(__file__).parent))
from conftest import diverse_rows, downstream_rows  # noqa: E402

from delia import DSFTConfig, DSFTTrainer, add_new_tokens  # noqa: E402
from delia.runtime import leave_process_group  # noqa: E402
from delia.tiny import build_tiny_model, build_tiny_tokenizer  # noqa: E402


def mixture_hash(dataset: Dataset) -> str:
    return hashlib.sha256(json.dumps([list(dataset["prompt"]), list(dataset["source"])]).encode()).hexdigest()


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
    )
    trainer = DSFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(downstream_rows()),
        diverse_dataset=Dataset.from_list(diverse_rows()),
        diverse_ratio=1,
        processing_class=tokenizer,
    )
    order = mixture_hash(trainer.train_dataset)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {"order": order, "logs": logs, "world_size": trainer.args.world_size}
    Path(output_dir, f"rank{trainer.args.process_index}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1])
    leave_process_group()  # as `delia train` does: no rank hangs or aborts at exit
