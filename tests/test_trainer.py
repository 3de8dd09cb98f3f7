"""DSFTTrainer: mixing at init, completion-only labels for any template, exact per-source loss, arguments."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from conftest import diverse_rows, downstream_rows, write_jsonl
from datasets import Dataset

from delia import DSFTConfig, DSFTTrainer, add_new_tokens
from delia.run_files import MIXTURE_FILE


def make_trainer(make_tokenizer, make_model, make_config, template="llama2", tied=True, **kwargs):
    tokenizer = make_tokenizer(template)
    model = make_model(tokenizer, tied=tied)
    add_new_tokens(tokenizer, model, ["<sep>"])
    config = kwargs.pop("args", None) or make_config(**kwargs.pop("config", {}))
    kwargs.setdefault("train_dataset", Dataset.from_list(downstream_rows()))
    kwargs.setdefault("diverse_dataset", Dataset.from_list(diverse_rows()))
    return DSFTTrainer(model=model, args=config, processing_class=tokenizer, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Labels: the loss falls on the assistant reply only, with or without generation markers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["llama2", "chatml"])
def test_labels_cover_the_assistant_reply_only(make_tokenizer, make_model, make_config, template):
    trainer = make_trainer(make_tokenizer, make_model, make_config, template=template, diverse_ratio=1)
    tokenizer = trainer.processing_class
    checked = 0
    for row in trainer.train_dataset:
        reply = row["completion"][0]["content"]
        labelled = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label != -100]
        unlabelled = [token for token, label in zip(row["input_ids"], row["labels"], strict=True) if label == -100]
        labelled_text = tokenizer.decode(labelled)
        assert labelled_text.strip().startswith(reply.strip()), labelled_text
        assert tokenizer.eos_token in labelled_text  # the model learns to stop
        assert row["prompt"][-1]["content"].strip() in tokenizer.decode(unlabelled)
        assert reply.strip() not in tokenizer.decode(unlabelled)
        checked += 1
    assert checked == 16


# ----------------------------------------------------------------------------------------------------------------------
# Mixing at init, the mixture record and the argument aliases
# ----------------------------------------------------------------------------------------------------------------------


def test_mixture_is_built_at_init_and_recorded(make_tokenizer, make_model, make_config, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="delia"):
        trainer = make_trainer(make_tokenizer, make_model, make_config, diverse_ratio=2.5)
    sources = trainer.train_dataset["source"]
    assert sources.count("downstream") == 8 and sources.count("diverse") == 20
    record = json.loads((tmp_path / "run" / MIXTURE_FILE).read_text())
    assert record["sources"]["downstream"]["rows"] == 8
    assert record["sources"]["diverse"]["rows"] == 20
    assert record["sources"]["diverse"]["loss_tokens"] > 0
    assert record["cache_rows"] == 40 and record["resolved_sampling"] == "without_replacement"
    assert record["diverse_seed"] == 0 and record["diverse_ratio"] == 2.5
    assert any("DELIA mixture" in message for message in caplog.messages)


def test_original_argument_names_and_paths(make_tokenizer, make_model, make_config, tmp_path):
    tokenizer = make_tokenizer("llama2")
    model = make_model(tokenizer)
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(), trailing_newline=False)
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows())
    with pytest.warns(FutureWarning, match="processing_class"):
        trainer = DSFTTrainer(
            cache_dir=str(cache),
            diverse_ratio=3,
            train_dataset=str(train),
            eval_dataset=str(train),
            model=model,
            args=make_config(diverse_ratio=1),
            tokenizer=tokenizer,
        )
    assert trainer.args.diverse_ratio == 3.0 and trainer.args.diverse_dataset == str(cache)
    assert trainer.train_dataset["source"].count("diverse") == 24
    assert set(trainer.eval_dataset["source"]) == {"downstream"}


def test_conflicting_aliases_are_rejected(make_tokenizer, make_model, make_config, tmp_path):
    tokenizer = make_tokenizer("llama2")
    with pytest.raises(ValueError, match="processing_class"):
        DSFTTrainer(
            model=make_model(tokenizer),
            args=make_config(),
            train_dataset=Dataset.from_list(downstream_rows()),
            processing_class=tokenizer,
            tokenizer=make_tokenizer("llama2"),
        )
    with pytest.raises(ValueError, match="cache_dir"):
        DSFTTrainer(
            model=make_model(tokenizer),
            args=make_config(),
            train_dataset=Dataset.from_list(downstream_rows()),
            processing_class=tokenizer,
            diverse_dataset="a.jsonl",
            cache_dir="b.jsonl",
        )
    with pytest.raises(ValueError, match="-1"):
        make_trainer(make_tokenizer, make_model, make_config, diverse_ratio=-1)


def test_sft_config_is_upgraded(make_tokenizer, make_model, tmp_path):
    from trl import SFTConfig

    tokenizer = make_tokenizer("llama2")
    args = SFTConfig(output_dir=str(tmp_path / "sft"), report_to="none", bf16=False, max_steps=1, seed=3)
    trainer = DSFTTrainer(
        model=make_model(tokenizer),
        args=args,
        train_dataset=Dataset.from_list(downstream_rows()),
        processing_class=tokenizer,
        diverse_dataset=Dataset.from_list(diverse_rows()),
        diverse_ratio=1,
    )
    assert isinstance(trainer.args, DSFTConfig) and trainer.args.diverse_seed == 3


# ----------------------------------------------------------------------------------------------------------------------
# Per-source loss: exact, invariant to accumulation, absent sources absent
# ----------------------------------------------------------------------------------------------------------------------


class RecordingCollator:
    """Keeps a copy of every batch the trainer's collator produces, in order."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, examples):
        batch = self.collator(examples)
        self.batches.append({key: value.clone() for key, value in batch.items() if torch.is_tensor(value)})
        return batch


def train_logs(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_per_source_loss_matches_an_independent_computation(make_tokenizer, make_model, make_config):
    # learning_rate=0 keeps the model fixed, so every batch can be scored again afterwards
    trainer = make_trainer(
        make_tokenizer,
        make_model,
        make_config,
        diverse_ratio=1,
        config={
            "learning_rate": 0.0,
            "per_device_train_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "max_steps": 3,
        },
    )
    recorder = RecordingCollator(trainer.data_collator)
    trainer.data_collator = recorder
    logs = train_logs(trainer)
    assert len(logs) == 3 and len(recorder.batches) >= 6

    model = trainer.model.eval()
    for step, entry in enumerate(logs):
        nll, tokens = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for batch in recorder.batches[2 * step : 2 * step + 2]:
            with torch.no_grad():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            per_token = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2).double(), labels.clamp(min=0), reduction="none"
            ) * (labels != -100)
            for row, source in enumerate(batch["source_ids"].tolist()):
                nll[source] += per_token[row].sum()
                tokens[source] += (labels[row] != -100).sum()
        for index, name in enumerate(("downstream", "diverse")):
            if tokens[index] > 0:
                assert entry[f"loss_{name}"] == pytest.approx((nll[index] / tokens[index]).item(), rel=1e-5)
            else:
                assert f"loss_{name}" not in entry
        combined = sum(
            entry.get(f"loss_{name}", 0.0) * tokens[i].item() for i, name in enumerate(("downstream", "diverse"))
        )
        assert entry["loss"] == pytest.approx(combined / tokens.sum().item(), rel=1e-5)


def test_per_source_loss_is_invariant_to_gradient_accumulation(make_tokenizer, make_model, make_config):
    def logs_for(batch_size, accumulation):
        trainer = make_trainer(
            make_tokenizer,
            make_model,
            make_config,
            diverse_ratio=1,
            config={
                "per_device_train_batch_size": batch_size,
                "gradient_accumulation_steps": accumulation,
                "max_steps": 3,
            },
        )
        return train_logs(trainer)

    whole, accumulated = logs_for(4, 1), logs_for(2, 2)
    keys = ("loss", "loss_downstream", "loss_diverse")
    assert any("loss_downstream" in entry and "loss_diverse" in entry for entry in whole)
    for one, other in zip(whole, accumulated, strict=True):
        assert {k for k in keys if k in one} == {k for k in keys if k in other}
        for key in keys:
            if key in one:
                assert one[key] == pytest.approx(other[key], rel=1e-4), key


def test_ratio_zero_is_plain_sft_without_per_source_keys(make_tokenizer, make_model, make_config):
    trainer = make_trainer(
        make_tokenizer,
        make_model,
        make_config,
        diverse_ratio=0,
        eval_dataset=Dataset.from_list(downstream_rows(4)),
        config={"eval_strategy": "steps", "eval_steps": 2},
    )
    trainer.train()
    assert "source" not in trainer.train_dataset.column_names
    logged = {key for entry in trainer.state.log_history for key in entry}
    assert "loss" in logged and "eval_loss" in logged
    assert not any(key.startswith(("loss_", "eval_loss_")) for key in logged)


def test_absent_source_gets_no_key_and_untagged_eval_counts_as_downstream(make_tokenizer, make_model, make_config):
    trainer = make_trainer(
        make_tokenizer,
        make_model,
        make_config,
        diverse_ratio=1,
        eval_dataset=Dataset.from_list(downstream_rows(4)),
        config={"eval_strategy": "steps", "eval_steps": 2},
    )
    trainer.train()
    train_entries = [entry for entry in trainer.state.log_history if "loss" in entry]
    eval_entries = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert train_entries and all(math.isfinite(entry["loss_downstream"]) for entry in train_entries)
    assert eval_entries and all("eval_loss_diverse" not in entry for entry in eval_entries)
    assert all(entry["eval_loss_downstream"] == pytest.approx(entry["eval_loss"], rel=1e-5) for entry in eval_entries)


def test_eval_keeps_source_tags_of_a_mixed_eval_set(make_tokenizer, make_model, make_config):
    from delia import mix_datasets

    mixed_eval = mix_datasets(Dataset.from_list(downstream_rows(4)), Dataset.from_list(diverse_rows(8)), ratio=1)
    trainer = make_trainer(make_tokenizer, make_model, make_config, diverse_ratio=1, eval_dataset=mixed_eval)
    metrics = trainer.evaluate()
    assert {"eval_loss_downstream", "eval_loss_diverse"} <= set(metrics)


@pytest.mark.parametrize("setting", [{"packing": True, "max_length": 64}, {"padding_free": True, "max_length": None}])
def test_packing_and_padding_free_turn_per_source_logging_off(make_tokenizer, make_model, make_config, setting):
    with pytest.warns(UserWarning, match="Per-source loss logging is off"):
        trainer = make_trainer(make_tokenizer, make_model, make_config, diverse_ratio=1, config=setting)
    logs = train_logs(trainer)
    assert logs and all("loss_downstream" not in entry and "loss_diverse" not in entry for entry in logs)


def test_full_fine_tuning_updates_the_whole_model_and_lowers_the_loss(make_tokenizer, make_model, make_config):
    trainer = make_trainer(
        make_tokenizer, make_model, make_config, diverse_ratio=1, config={"max_steps": 12, "learning_rate": 1e-2}
    )
    before = {name: parameter.detach().clone() for name, parameter in trainer.model.named_parameters()}
    logs = train_logs(trainer)
    changed = [name for name, parameter in trainer.model.named_parameters() if not torch.equal(parameter, before[name])]
    assert "model.embed_tokens.weight" in changed and any("mlp" in name for name in changed)
    assert len(changed) == len(before)
    assert logs[-1]["loss"] < logs[0]["loss"]
