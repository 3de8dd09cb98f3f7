"""Tracked-token loss: equal to a plain full-logits computation under right and left padding, keys, the JSONL, errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import diverse_rows, downstream_rows
from datasets import Dataset
from transformers import HfArgumentParser

from delia import DSFTConfig, DSFTTrainer, add_new_tokens, get_peft_config
from delia.run_files import TOKEN_LOSS_FILE
from delia.token_loss import resolve_track_tokens, valid_targets

TRACKED = ["<sep>", "'", "</s>", "<|im_start|>"]  # </s> is also the padding; <|im_start|> never occurs here


class Recording:
    """Keeps every batch the collator produces; `left=True` moves each row's padding to its left first."""

    def __init__(self, collator, pad_token_id: int, left: bool = False):
        self.collator, self.pad_token_id, self.left, self.batches = collator, pad_token_id, left, []

    def __call__(self, examples):
        batch = self.collator(examples)
        if self.left:
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            for key, pad in (("input_ids", self.pad_token_id), ("attention_mask", 0), ("labels", -100)):
                moved = torch.full_like(batch[key], pad)
                for row, length in enumerate(lengths):
                    moved[row, moved.shape[1] - length :] = batch[key][row, :length]
                batch[key] = moved
        self.batches.append({key: value.clone() for key, value in batch.items() if torch.is_tensor(value)})
        return batch


def reference_token_loss(model, batches, token_ids: dict[str, int]) -> dict[str, tuple[float, int]]:
    """The slow way: full logits, full log_softmax, a Python loop over every position of every row."""
    sums = {name: [0.0, 0] for name in token_ids}
    by_id = {token_id: name for name, token_id in token_ids.items()}
    model.eval()
    for batch in batches:
        with torch.no_grad():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_probs = torch.log_softmax(logits.double(), dim=-1)
        ids, mask = batch["input_ids"].tolist(), batch["attention_mask"].tolist()
        for row in range(len(ids)):
            for t in range(1, len(ids[row])):
                if mask[row][t] and mask[row][t - 1] and ids[row][t] in by_id:
                    entry = sums[by_id[ids[row][t]]]
                    entry[0] -= log_probs[row, t - 1, ids[row][t]].item()
                    entry[1] += 1
    return {name: (nll, count) for name, (nll, count) in sums.items()}


def tracking_trainer(make_tokenizer, make_model, make_config, *, left: bool, peft: bool, track=TRACKED):
    tokenizer = make_tokenizer("llama2")
    model = make_model(tokenizer, tied=not peft)
    add_new_tokens(tokenizer, model, ["<sep>"])
    config = make_config(track_tokens=track, per_device_eval_batch_size=2, max_steps=1, learning_rate=5e-2)
    trainer = DSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(downstream_rows()),
        eval_dataset=Dataset.from_list(downstream_rows(5)),  # 3 batches, the last one of a single row
        diverse_dataset=Dataset.from_list(diverse_rows()),
        diverse_ratio=1,
        processing_class=tokenizer,
        peft_config=get_peft_config(r=4, lora_alpha=8) if peft else None,
    )
    trainer.data_collator = Recording(trainer.data_collator, tokenizer.pad_token_id, left=left)
    return trainer


@pytest.mark.parametrize(("left", "peft"), [(False, False), (True, True)], ids=["right-padded", "left-padded-peft"])
def test_tracked_token_loss_equals_a_full_logits_reference(make_tokenizer, make_model, make_config, left, peft):
    trainer = tracking_trainer(make_tokenizer, make_model, make_config, left=left, peft=peft)
    trainer.train()  # one step, so the evaluated model is not the initial one (and LoRA is not a no-op)
    recorder = trainer.data_collator
    recorder.batches.clear()
    metrics = trainer.evaluate()
    assert len(recorder.batches) == 3
    pads = [batch["attention_mask"][:, 0 if left else -1] for batch in recorder.batches]
    assert any((p == 0).any() for p in pads), "the batches are not padded on the side under test"

    token_ids = resolve_track_tokens(trainer.processing_class, TRACKED)
    expected = reference_token_loss(trainer.model, recorder.batches, token_ids)
    assert expected["<sep>"][1] == 5 and expected["'"][1] > 5  # every prompt has one <sep>; quotes on both sides
    for name in ("<sep>", "'", "</s>"):
        nll, count = expected[name]
        assert metrics[f"eval_token_loss/{name}"] == pytest.approx(nll / count, rel=1e-5)
    assert "eval_token_loss/<|im_start|>" not in metrics  # never a target in the eval set: no key

    record = json.loads(open(f"{trainer.args.output_dir}/{TOKEN_LOSS_FILE}").read().splitlines()[-1])
    assert record["step"] == 1 and record["prefix"] == "eval"
    assert record["tokens"]["<sep>"]["count"] == 5
    assert record["tokens"]["'"]["nll_sum"] == pytest.approx(expected["'"][0], rel=1e-5)
    assert record["tokens"]["<|im_start|>"] == {"nll_sum": 0.0, "count": 0, "mean": None}


def test_jsonl_goes_to_output_dir_one_line_per_evaluation(
    make_tokenizer, make_model, make_config, tmp_path, monkeypatch
):
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    trainer = tracking_trainer(make_tokenizer, make_model, make_config, left=False, peft=False, track=["<sep>"])
    first, second = trainer.evaluate(), trainer.evaluate()
    path = tmp_path / "run" / TOKEN_LOSS_FILE
    with open(path, "a") as handle:
        handle.write('{"step": 7, "tok')  # a run killed in the middle of a line
    trainer.predict(trainer.eval_dataset)  # predict() logs nothing and must not leak into the next evaluation
    third = trainer.evaluate()
    assert first["eval_token_loss/<sep>"] == pytest.approx(second["eval_token_loss/<sep>"], rel=1e-6)
    assert third["eval_token_loss/<sep>"] == pytest.approx(first["eval_token_loss/<sep>"], rel=1e-6)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert (tmp_path / "run" / f"{TOKEN_LOSS_FILE}.partial").read_text() == '{"step": 7, "tok\n'
    assert len(records) == 3 and all(record["tokens"]["<sep>"]["count"] == 5 for record in records)
    assert list(elsewhere.iterdir()) == []
    logged = [entry for entry in trainer.state.log_history if "eval_token_loss/<sep>" in entry]
    assert len(logged) == 3


def test_track_tokens_are_single_tokens_or_ids(make_tokenizer, make_model, make_config):
    tokenizer = make_tokenizer("llama2")
    model = make_model(tokenizer)
    add_new_tokens(tokenizer, model, ["<sep>"])
    sep = tokenizer.convert_tokens_to_ids("<sep>")
    assert resolve_track_tokens(tokenizer, ["<sep>", 5]) == {"<sep>": sep, tokenizer.convert_ids_to_tokens(5): 5}
    with pytest.raises(ValueError, match=r"'hallucination verdict' is not a single token; the tokenizer splits it"):
        DSFTTrainer(
            model=model,
            args=make_config(track_tokens=["<sep>", "hallucination verdict"]),
            train_dataset=Dataset.from_list(downstream_rows()),
            processing_class=tokenizer,
        )
    for bad, message in (([sep, "<sep>"], "listed twice"), ([10**6], "outside the tokenizer's vocabulary")):
        with pytest.raises(ValueError, match=message):
            resolve_track_tokens(tokenizer, bad)
    with pytest.raises(ValueError, match="track_tokens must be a list"):
        make_config(track_tokens=[["<sep>"]])


def test_track_tokens_from_the_command_line(tmp_path):
    (args,) = HfArgumentParser(DSFTConfig).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--report_to", "none", "--track_tokens", "<sep>", "'"]
    )
    assert args.track_tokens == ["<sep>", "'"]


def test_valid_targets_exclude_padding_and_sequence_starts():
    ids = torch.tensor([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert valid_targets(ids, mask).tolist() == [[False, False, True, True], [True, True, False, False]]
    packed = torch.tensor([[0, 1, 2, 0, 1]])  # padding-free: two sequences in one row
    assert valid_targets(ids[:1], None, packed).tolist() == [[True, True, False, True]]
