"""delia.utils: new-token init by id, LoRA with trainable token rows (tied and untied), save/reload, quantization."""

from __future__ import annotations

import pytest
import torch
from conftest import diverse_rows, downstream_rows, write_jsonl
from datasets import Dataset
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from delia import DSFTTrainer, add_new_tokens, get_peft_config, get_training_arguments, setup_tokenizer_and_model
from delia.tiny import save_tiny_model
from delia.utils import NEW_TOKEN_IDS_ATTRIBUTE


def embedding_rows(model):
    return model.get_input_embeddings().weight.detach().clone(), model.get_output_embeddings().weight.detach().clone()


# ----------------------------------------------------------------------------------------------------------------------
# New tokens
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_new_token_rows_are_initialised_by_id(make_tokenizer, make_model, tied):
    tokenizer = make_tokenizer("llama2")
    model = make_model(tokenizer, tied=tied)
    old_vocab = len(tokenizer)
    old_input, old_output = embedding_rows(model)
    [sep_id] = add_new_tokens(tokenizer, model, ["<sep>"], init="mean")
    new_input, new_output = embedding_rows(model)

    assert sep_id == old_vocab and tokenizer.convert_ids_to_tokens(sep_id) == "<sep>"
    assert "<sep>" in tokenizer.all_special_tokens and tokenizer.sep_token == "<sep>"
    assert new_input.shape[0] % 64 == 0 and new_input.shape[0] >= old_vocab + 1
    torch.testing.assert_close(new_input[sep_id], old_input.mean(dim=0))
    torch.testing.assert_close(new_output[sep_id], old_output.mean(dim=0))
    torch.testing.assert_close(new_input[:old_vocab], old_input)  # existing rows untouched
    torch.testing.assert_close(
        new_input[sep_id + 1 :], old_input.mean(dim=0).expand(new_input.shape[0] - sep_id - 1, -1)
    )
    assert getattr(model.config, NEW_TOKEN_IDS_ATTRIBUTE) == [sep_id]
    # "<sep>" is one token, not split into pieces
    assert tokenizer("a <sep> b", add_special_tokens=False)["input_ids"].count(sep_id) == 1


def test_new_token_init_from_a_description(make_tokenizer, make_model):
    tokenizer = make_tokenizer("llama2")
    model = make_model(tokenizer, tied=False)
    old_input, old_output = embedding_rows(model)
    description = "Follow the format"
    piece_ids = tokenizer(description, add_special_tokens=False)["input_ids"]
    [sep_id] = add_new_tokens(tokenizer, model, ["<sep>"], init={"<sep>": description})
    new_input, new_output = embedding_rows(model)
    torch.testing.assert_close(new_input[sep_id], old_input[piece_ids].mean(dim=0))
    torch.testing.assert_close(new_output[sep_id], old_output[piece_ids].mean(dim=0))
    assert not torch.allclose(new_input[sep_id], old_input.mean(dim=0))


def test_random_init_is_seeded_and_known_tokens_are_kept(make_tokenizer, make_model):
    rows = []
    for _ in range(2):
        tokenizer = make_tokenizer("llama2")
        model = make_model(tokenizer)
        [sep_id] = add_new_tokens(tokenizer, model, ["<sep>"], init="random", seed=7)
        rows.append(model.get_input_embeddings().weight[sep_id].detach().clone())
    torch.testing.assert_close(rows[0], rows[1])
    before = model.get_input_embeddings().weight.detach().clone()
    assert add_new_tokens(tokenizer, model, ["<sep>"], init="mean") == [sep_id]  # already there: left alone
    torch.testing.assert_close(model.get_input_embeddings().weight, before)
    with pytest.raises(ValueError, match="new_token_init"):
        add_new_tokens(make_tokenizer("llama2"), make_model(make_tokenizer("llama2")), ["<x>"], init="zeros")
    with pytest.raises(ValueError, match="no description for '<y>'"):
        add_new_tokens(make_tokenizer("llama2"), make_model(make_tokenizer("llama2")), ["<y>"], init={"<x>": "a"})


def test_setup_tokenizer_and_model_on_cpu(make_tokenizer, make_model, tmp_path):
    tokenizer = make_tokenizer("chatml")
    make_model(tokenizer, tied=False).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    loaded_tokenizer, model = setup_tokenizer_and_model(tmp_path / "base")
    assert model.dtype == torch.float32 and not getattr(model, "is_loaded_in_8bit", False)
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token and model.config.pad_token_id is not None
    assert loaded_tokenizer.convert_tokens_to_ids("<sep>") == len(tokenizer)
    with pytest.raises(OSError, match="could not load model"):
        setup_tokenizer_and_model(tmp_path / "missing")
    with pytest.raises(ValueError, match="quantization"):
        setup_tokenizer_and_model(tmp_path / "base", quantization="3bit")


# ----------------------------------------------------------------------------------------------------------------------
# LoRA: only the new tokens' rows train, tied and untied, and the adapter reloads exactly
# ----------------------------------------------------------------------------------------------------------------------


def sep_rows(tokens: int = 8) -> Dataset:
    rows = downstream_rows(tokens)
    for row in rows:
        row["messages"][1]["content"] = "<sep> " + row["messages"][1]["content"]
    return Dataset.from_list(rows)


def lora_dsft(model, tokenizer, args) -> DSFTTrainer:
    """LoRA r=4 with `<sep>` rows trainable (resolved from the model), on `<sep>` rows mixed 1:1 with diverse rows."""
    return DSFTTrainer(
        model=model,
        args=args,
        train_dataset=sep_rows(),
        diverse_dataset=Dataset.from_list(diverse_rows()),
        diverse_ratio=1,
        processing_class=tokenizer,
        peft_config=get_peft_config(r=4, lora_alpha=8),
    )


def lora_trainer(make_tokenizer, make_model, make_config, tied):
    tokenizer = make_tokenizer("llama2")
    model = make_model(tokenizer, tied=tied)
    [sep_id] = add_new_tokens(tokenizer, model, ["<sep>"])
    before = embedding_rows(model)
    return lora_dsft(model, tokenizer, make_config(learning_rate=5e-2, max_steps=3)), sep_id, before


@pytest.mark.parametrize("tied", [True, False])
def test_lora_trains_only_the_new_token_rows(make_tokenizer, make_model, make_config, tied):
    trainer, sep_id, (input_before, output_before) = lora_trainer(make_tokenizer, make_model, make_config, tied)
    trainable = [name for name, parameter in trainer.model.named_parameters() if parameter.requires_grad]
    assert all("lora_" in name or "trainable_tokens_delta" in name for name in trainable)
    assert any("embed_tokens.token_adapter" in name for name in trainable)
    assert any("lm_head.token_adapter" in name for name in trainable) == (not tied)
    trainer.train()

    model = trainer.model
    input_after = model.get_input_embeddings().weight.detach()
    output_after = model.get_output_embeddings().weight.detach()
    others = torch.ones(input_after.shape[0], dtype=torch.bool)
    others[sep_id] = False
    torch.testing.assert_close(input_after[others], input_before[others])
    torch.testing.assert_close(output_after[others], output_before[others])
    assert not torch.allclose(input_after[sep_id], input_before[sep_id])
    assert not torch.allclose(output_after[sep_id], output_before[sep_id])  # the LM head row trains too
    base_layer = model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight
    assert base_layer.requires_grad is False


@pytest.mark.parametrize("tied", [True, False])
def test_adapter_with_new_token_saves_and_reloads_to_identical_logits(make_config, tmp_path, tied):
    save_tiny_model(tmp_path / "base", "llama2", tie_word_embeddings=tied)
    tokenizer, model = setup_tokenizer_and_model(tmp_path / "base")
    trainer = lora_dsft(model, tokenizer, make_config(learning_rate=5e-2, max_steps=3))
    trainer.train()
    trainer.save_model(tmp_path / "adapter")
    probe = tokenizer("[INST] Follow the <sep> format [/INST] <sep>", return_tensors="pt").input_ids
    trained = trainer.model.eval()
    with torch.no_grad():
        expected = trained(input_ids=probe).logits

    reloaded_tokenizer, base = setup_tokenizer_and_model(tmp_path / "base")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        actual = reloaded(input_ids=probe).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    assert AutoTokenizer.from_pretrained(tmp_path / "adapter").convert_tokens_to_ids("<sep>") == len(tokenizer) - 1
    # the trained rows differ from a fresh base, so the comparison above is not trivially true
    fresh_tokenizer, fresh = setup_tokenizer_and_model(tmp_path / "base")
    with torch.no_grad():
        assert not torch.allclose(fresh(input_ids=probe).logits, expected)


# ----------------------------------------------------------------------------------------------------------------------
# Quantization through bitsandbytes on CPU
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_quantized_load_and_lora_step_on_cpu(make_config, tmp_path, quantization):
    pytest.importorskip("bitsandbytes")
    save_tiny_model(tmp_path / "base", "llama2", tie_word_embeddings=False)
    tokenizer, model = setup_tokenizer_and_model(tmp_path / "base", quantization=quantization)
    assert getattr(model, f"is_loaded_in_{quantization}")
    layer = type(model.model.layers[0].self_attn.q_proj).__name__
    assert layer == {"4bit": "Linear4bit", "8bit": "Linear8bitLt"}[quantization]
    trainer = lora_dsft(model, tokenizer, make_config(learning_rate=5e-2, max_steps=1))
    lora_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    lora_after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(lora_after[n].detach(), before) for n, before in lora_before.items())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["4bit", "8bit"])
def test_qlora_step_on_cuda_in_bf16(make_config, tmp_path, quantization):
    save_tiny_model(tmp_path / "base", "llama2", tie_word_embeddings=False)
    tokenizer, model = setup_tokenizer_and_model(tmp_path / "base", quantization=quantization, dtype="bfloat16")
    assert model.device.type == "cuda"
    trainer = lora_dsft(model, tokenizer, make_config(learning_rate=5e-2, max_steps=2, bf16=True))
    sep_id = tokenizer.convert_tokens_to_ids("<sep>")
    before = trainer.model.get_input_embeddings().weight[sep_id].detach().clone()
    trainer.train()
    after = trainer.model.get_input_embeddings().weight[sep_id].detach()
    assert not torch.allclose(after.float(), before.float())
    assert all(torch.isfinite(torch.tensor(e["loss"])) for e in trainer.state.log_history if "loss" in e)


# ----------------------------------------------------------------------------------------------------------------------
# Training arguments, and the original README's script end to end
# ----------------------------------------------------------------------------------------------------------------------


def test_training_arguments_follow_the_original_recipe(tmp_path):
    args = get_training_arguments(str(tmp_path), 1, 2e-4, 16, 4, max_seq_length=4096, report_to="none")
    assert args.max_length == 4096 and args.logging_steps == 1 and args.warmup_steps == 25
    assert args.lr_scheduler_type == "constant_with_warmup" and args.weight_decay == 0.01
    if torch.cuda.is_available():
        assert args.gradient_checkpointing is True
    else:  # on a CPU the precision and checkpointing follow DSFTConfig's CPU defaults
        assert args.gradient_checkpointing is False and args.fp16 is False
        assert args.cpu_defaults == ("bf16", "gradient_checkpointing")
    assert args.eval_steps == 0.1 and args.diverse_ratio == 100.0
    assert (
        get_training_arguments(str(tmp_path), 1, 2e-4, 16, 4, 128, report_to="none", eval_strategy="no").eval_strategy
        == "no"
    )


def test_original_readme_script_end_to_end(make_tokenizer, tmp_path):
    """The original README's recipe, on a tiny local model: same names, same arguments (minus the removed TRL
    collator, which completion-only loss now replaces)."""
    save_tiny_model(tmp_path / "llama2", "llama2", tie_word_embeddings=False)
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(8), trailing_newline=False)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", downstream_rows(4), trailing_newline=False)
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(40))

    from delia.DSFTTrainer import DSFTTrainer as OriginalPathTrainer
    from delia.utils import get_peft_config, get_training_arguments, setup_tokenizer_and_model

    tokenizer, model = setup_tokenizer_and_model(str(tmp_path / "llama2"))
    peft_config = get_peft_config()
    training_args = get_training_arguments(
        output_dir=str(tmp_path / "result"),
        num_train_epochs=1,
        learning_rate=2e-4,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        max_seq_length=model.config.max_position_embeddings,
        report_to="none",
    )
    with pytest.warns(FutureWarning, match="tokenizer"):
        trainer = OriginalPathTrainer(
            cache_dir=str(cache),
            diverse_ratio=2,
            train_dataset=str(train),
            eval_dataset=str(evaluation),
            model=model,
            args=training_args,
            peft_config=peft_config,
            tokenizer=tokenizer,
        )
    trainer.train()
    trainer.save_model()
    result = tmp_path / "result"
    assert (result / "adapter_model.safetensors").exists() and (result / "delia_mixture.json").exists()
    assert trainer.state.global_step == 6  # (8 + 16 rows) / batch 4, one epoch
    assert any("eval_loss_downstream" in entry for entry in trainer.state.log_history)
    assert any("loss_diverse" in entry for entry in trainer.state.log_history)
    model_reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama2")
    assert model_reloaded.config.vocab_size == len(make_tokenizer("llama2"))  # the base on disk is untouched
