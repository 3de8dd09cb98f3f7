"""`delia probe`: variants, shapes, batching, a known answer, base + LoRA adapter side by side, bad input."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import write_jsonl
from peft import get_peft_model

from delia import add_new_tokens, get_peft_config, setup_tokenizer_and_model
from delia.cli import main
from delia.evaluation.probe import (
    EXPLICIT_FORMAT,
    last_position_states,
    load_prompts,
    make_variants,
    probe_model,
    summary_score,
)
from delia.tiny import save_tiny_model


def test_variants_differ_only_where_they_should():
    prompt = "\n'user_query' : What is 2 + 2?\n'chatgpt_response' : 5\n\n\nUsing the <sep> format, tell if it is wrong."
    variants = make_variants(prompt)
    assert variants["sep"] == prompt
    assert variants["explicit"] == prompt.replace("the <sep> format", EXPLICIT_FORMAT)
    assert variants["control"] == "\n'user_query' : What is 2 + 2?\n'chatgpt_response' : 5"
    assert make_variants("Q?\nFollowing <sep>, answer.")["explicit"] == f"Q?\nFollowing {EXPLICIT_FORMAT}, answer."
    for bad in ("no token here", "Answer in <sep> format."):
        with pytest.raises(ValueError):
            make_variants(bad)


def test_states_have_one_row_per_layer_and_prompt_and_ignore_batching(make_tokenizer, make_model):
    tokenizer = make_tokenizer("chatml")  # a template with a generation prompt
    model = make_model(tokenizer).eval()
    add_new_tokens(tokenizer, model, ["<sep>"])
    texts = [variant["sep"] for variant in load_prompts(limit=5)]
    one_by_one = last_position_states(model, tokenizer, texts, batch_size=1)
    batched = last_position_states(model, tokenizer, texts, batch_size=4)  # left padding in the first batch
    layers = model.config.num_hidden_layers + 1
    assert one_by_one.shape == (layers, 5, model.config.hidden_size)
    torch.testing.assert_close(batched, one_by_one, rtol=1e-4, atol=1e-5)
    # layer 0 is the embedding of the generation prompt's last token: the same for every text
    assert torch.allclose(one_by_one[0], one_by_one[0, :1].expand_as(one_by_one[0]))


def test_a_sep_embedded_as_the_explicit_phrase_scores_higher_than_a_random_one(make_tokenizer, make_model):
    prompts = load_prompts(limit=8)
    for seed in (0, 1):
        tokenizer = make_tokenizer("llama2")
        model = make_model(tokenizer, seed=seed)
        add_new_tokens(tokenizer, model, ["<sep>"])
        sep = tokenizer.convert_tokens_to_ids("<sep>")
        phrase = tokenizer(EXPLICIT_FORMAT, add_special_tokens=False)["input_ids"]
        embeddings = model.get_input_embeddings().weight
        as_phrase, random = copy.deepcopy(model).eval(), copy.deepcopy(model).eval()
        with torch.no_grad():
            as_phrase.get_input_embeddings().weight[sep] = embeddings[phrase].mean(dim=0)
            noise = torch.randn(embeddings.shape[1], generator=torch.Generator().manual_seed(seed))
            random.get_input_embeddings().weight[sep] = noise * embeddings[: len(tokenizer) - 1].std()
        meant = probe_model(tokenizer, as_phrase, prompts, "as phrase")
        noisy = probe_model(tokenizer, random, prompts, "random")
        assert meant.scores["score"][0] == noisy.scores["score"][0] == 0.0  # same token at the last position
        assert meant.scores["score"][1] > noisy.scores["score"][1], (meant.scores, noisy.scores)
        in_phrase = [sum(entry["id"] in phrase for entry in probed.nearest) for probed in (meant, noisy)]
        assert in_phrase[0] > in_phrase[1]
        assert all(entry["id"] != sep for entry in meant.nearest) and len(meant.nearest) == 10


def test_base_and_adapter_side_by_side(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", "llama2", tie_word_embeddings=False)
    tokenizer, model = setup_tokenizer_and_model(str(base), quantization=None)
    peft_model = get_peft_model(model, get_peft_config(r=4, lora_alpha=8, model=model))
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name or "trainable_tokens_delta" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    adapter = tmp_path / "run"
    peft_model.save_pretrained(adapter)
    tokenizer.save_pretrained(adapter)

    assert main(["probe", str(base), str(adapter), "--limit", "3", "--output", str(tmp_path / "probe")]) == 0
    printed = capsys.readouterr().out
    assert "nearest to <sep> in run" in printed and "layer" in printed
    report = json.loads((tmp_path / "probe" / "probe.json").read_text())
    assert (tmp_path / "probe" / "probe.png").read_bytes()[:4] == b"\x89PNG"
    assert [model["label"] for model in report["models"]] == ["base", "run"] and report["prompt_count"] == 3
    scores = [[layer["score"] for layer in model["layers"]] for model in report["models"]]
    assert len(scores[0]) == len(scores[1]) == 3 and scores[0] != scores[1]  # the adapter changes the states
    assert [len(model["nearest_tokens"]) for model in report["models"]] == [10, 10]


def test_bad_input_is_one_line(tmp_path, capsys):
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Q?\nFollow the <sep> format."},
                {"role": "assistant", "content": "a"},
            ]
        },
        {"messages": [{"role": "user", "content": "Q? No format."}, {"role": "assistant", "content": "a"}]},
    ]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    assert main(["probe", str(tmp_path / "nowhere"), "--prompts", str(prompts)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "prompts.jsonl, line 2" in error and "<sep>" in error
    assert main(["probe", str(tmp_path / "nowhere")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "nowhere" in error


def test_the_summary_score_is_the_mean_over_the_upper_half_of_the_blocks():
    assert summary_score([0.0, 1.0, 2.0, 3.0, 4.0]) == (3.5, (3, 4))  # 4 blocks: layers 3-4
    assert summary_score([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == (5.0, (4, 6))  # 6 blocks: layers 4-6
    assert summary_score([0.0, 0.5, 0.25]) == (0.25, (2, 2))  # 2 blocks: the last
    assert summary_score([0.0, 0.5]) == (0.5, (1, 1))  # 1 block: itself


def test_a_second_probe_is_refused_without_overwrite_and_the_summary_is_printed(tmp_path, capsys):
    base = save_tiny_model(tmp_path / "base", "llama2", num_hidden_layers=4)
    output = tmp_path / "probe"
    assert main(["probe", str(base), "--limit", "2", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    report = json.loads((output / "probe.json").read_text())
    (model,) = report["models"]
    scores = [layer["score"] for layer in model["layers"]]
    assert len(scores) == 5 and model["summary_layers"] == [3, 4]
    assert model["summary_score"] == pytest.approx(sum(scores[3:]) / 2)
    assert (
        f"summary score (mean over layers 3-4, the upper half of the blocks): base {model['summary_score']:.4f}"
        in printed
    )
    assert "upper half" in report["summary_score"]

    before = (output / "probe.json").read_bytes()
    # refused before any model loads: a model that does not exist is never reached
    assert main(["probe", str(tmp_path / "nowhere"), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "probe.json holds an earlier probe" in error and "--overwrite" in error
    assert (output / "probe.json").read_bytes() == before
    assert main(["probe", str(base), "--limit", "3", "--output", str(output), "--overwrite"]) == 0
    assert json.loads((output / "probe.json").read_text())["prompt_count"] == 3
