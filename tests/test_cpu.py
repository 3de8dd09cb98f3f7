"""Training on a CPU: delia's defaults there (bf16 where native, no gradient checkpointing while memory allows, free
threads) and the LM head on label positions only, against TRL's defaults on the same rows (tiny models)."""

from __future__ import annotations

import logging

import pytest
import torch
import trl.trainer.utils as trl_utils
from conftest import diverse_rows, downstream_rows
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

import delia.config
import delia.cpu
import delia.trainer
from delia import DSFTConfig, DSFTTrainer, add_new_tokens, get_peft_config, prepare_datasets
from delia.upstream import expose_trainable_token_lm_head_bias

SETTINGS = {
    "per_device_train_batch_size": 4,
    "max_steps": 3,
    "logging_steps": 1,
    "learning_rate": 5e-3,
    "report_to": "none",
    "save_strategy": "no",
    "dataloader_num_workers": 0,
    "disable_tqdm": True,
    "seed": 0,
}


@pytest.fixture
def rows_scored(monkeypatch) -> list[int]:
    """Records how many positions each call of TRL's fused LM head projects."""
    original = trl_utils._ChunkedLogProbFunction
    scored: list[int] = []

    class Recording(original):
        @classmethod
        def apply(cls, hidden, *args):
            scored.append(hidden.shape[0])
            return original.apply(hidden, *args)

    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", Recording)
    return scored


def lora_model(make_tokenizer, make_model):
    tokenizer = make_tokenizer("chatml")
    model = make_model(tokenizer, tied=True)
    add_new_tokens(tokenizer, model, ["<sep>"])
    return tokenizer, model


def step_losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_cpu_fast_path_gives_the_default_paths_losses_with_less_lm_head_work(
    make_tokenizer, make_model, tmp_path, rows_scored
):
    """delia's CPU path (no checkpointing, label positions only, its thread count) against TRL's defaults (gradient
    checkpointing, every position scored), both in float32 on the same rows: the same losses, a fraction of the
    positions through the LM head."""
    original_switch = trl_utils._use_triton
    prepared = prepare_datasets(Dataset.from_list(downstream_rows()), Dataset.from_list(diverse_rows()), ratio=1)
    tokenizer, model = lora_model(make_tokenizer, make_model)
    trl_trainer = SFTTrainer(
        model=model,
        args=SFTConfig(str(tmp_path / "trl"), **SETTINGS, bf16=False, use_cpu=True),
        train_dataset=prepared.train_dataset,
        processing_class=tokenizer,
        peft_config=get_peft_config(r=4, model=model),
    )
    expose_trainable_token_lm_head_bias(trl_trainer.model)
    assert trl_trainer.args.gradient_checkpointing is True  # TRL's default
    trl_trainer.train()
    trl_scored, rows_scored[:] = list(rows_scored), []

    tokenizer, model = lora_model(make_tokenizer, make_model)
    config = DSFTConfig(str(tmp_path / "delia"), **SETTINGS, bf16=False, diverse_ratio=1)
    assert config.gradient_checkpointing is False and config.cpu_defaults == ("gradient_checkpointing",)
    trainer = DSFTTrainer(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(downstream_rows()),
        diverse_dataset=Dataset.from_list(diverse_rows()),
        processing_class=tokenizer,
        peft_config=get_peft_config(r=4),
    )
    trainer.train()
    torch.testing.assert_close(step_losses(trainer), step_losses(trl_trainer), rtol=1e-5, atol=0)
    assert {"loss_downstream", "loss_diverse"} <= set(trainer.state.log_history[0])
    assert trl_utils._use_triton is original_switch  # TRL's switch is restored after each step

    label_positions = sum(sum(label != -100 for label in row["labels"][1:]) for row in trainer.train_dataset)
    assert sum(rows_scored) < sum(trl_scored) / 2  # only the labelled positions went through the LM head
    assert min(rows_scored) > 0 and sum(rows_scored) <= label_positions


def test_bf16_default_trains_under_autocast_close_to_float32(make_tokenizer, make_model, tmp_path, monkeypatch):
    """Where the CPU has native bf16 it is the default: the projections run in bf16, the losses stay close."""
    losses = {}
    for native in (False, True):
        monkeypatch.setattr(delia.config, "native_bf16", lambda native=native: native)
        config = DSFTConfig(str(tmp_path / str(native)), **SETTINGS)
        assert config.bf16 is native and "bf16" in config.cpu_defaults
        tokenizer, model = lora_model(make_tokenizer, make_model)
        dtypes = set()
        model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, a, out, seen=dtypes: seen.add(out.dtype))
        trainer = DSFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(downstream_rows()),
            processing_class=tokenizer,
            peft_config=get_peft_config(r=4),
        )
        trainer.train()
        assert dtypes == {torch.bfloat16 if native else torch.float32}
        losses[native] = step_losses(trainer)
    torch.testing.assert_close(losses[True], losses[False], rtol=0.03, atol=0)


def test_explicit_settings_win_over_the_cpu_defaults(tmp_path):
    config = DSFTConfig(str(tmp_path), report_to="none", bf16=False, gradient_checkpointing=True, cpu_threads=3)
    assert config.bf16 is False and config.activation_checkpointing is True and config.cpu_defaults == ()
    config = DSFTConfig(str(tmp_path), report_to="none", activation_checkpointing=True)  # the transformers 5 name
    assert config.gradient_checkpointing is True and "gradient_checkpointing" not in config.cpu_defaults
    with pytest.raises(ValueError, match="cpu_threads must be None or an integer >= 0; got -1"):
        DSFTConfig(str(tmp_path), report_to="none", cpu_threads=-1)


def test_free_threads_leave_out_busy_cores_and_launch_peers(monkeypatch):
    monkeypatch.setattr(delia.cpu, "usable_cores", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 8)
    monkeypatch.setattr(delia.cpu.os, "getloadavg", lambda: (0.4, 0.0, 0.0))
    assert delia.cpu.free_threads(1) == 8  # an idle machine: torch's own count
    assert delia.cpu.free_threads(2) == 4  # two processes of one launch share the cores
    monkeypatch.setattr(delia.cpu.os, "getloadavg", lambda: (4.0, 0.0, 0.0))
    assert delia.cpu.free_threads(1) == 5  # three cores kept busy by others
    monkeypatch.setattr(delia.cpu.os, "getloadavg", lambda: (30.0, 0.0, 0.0))
    assert delia.cpu.free_threads(1) == 1


def test_training_threads_are_set_for_the_run_and_restored(make_tokenizer, make_model, make_config, monkeypatch):
    seen = []
    tokenizer, model = lora_model(make_tokenizer, make_model)
    trainer = DSFTTrainer(
        model=model,
        args=make_config(cpu_threads=1, max_steps=1),
        train_dataset=Dataset.from_list(downstream_rows()),
        processing_class=tokenizer,
    )
    trainer.add_callback(
        type("Spy", (TrainerCallback,), {"on_step_end": lambda *a, **k: seen.append(torch.get_num_threads())})
    )
    before = torch.get_num_threads()
    trainer.train()
    assert seen == [1] and torch.get_num_threads() == before
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    trainer.args.cpu_threads = None
    assert trainer._cpu_threads() is None  # the user's OMP_NUM_THREADS stands
    trainer.args.cpu_threads = 0
    assert trainer._cpu_threads() is None


@pytest.mark.parametrize("memory, checkpointing", [(10**15, False), (10**3, True)])
def test_gradient_checkpointing_comes_back_when_activations_do_not_fit(
    make_tokenizer, make_model, tmp_path, monkeypatch, caplog, memory, checkpointing
):
    monkeypatch.setattr(delia.trainer, "available_memory", lambda: memory)
    tokenizer, model = lora_model(make_tokenizer, make_model)
    with caplog.at_level(logging.INFO, logger="delia.trainer"):
        trainer = DSFTTrainer(
            model=model,
            args=DSFTConfig(str(tmp_path), **SETTINGS, bf16=False),
            train_dataset=Dataset.from_list(downstream_rows()),
            processing_class=tokenizer,
            peft_config=get_peft_config(r=4),
        )
    assert (
        trainer.args.gradient_checkpointing is checkpointing and trainer.args.activation_checkpointing is checkpointing
    )
    assert ("Gradient checkpointing is on" in caplog.text) is checkpointing
    # set by hand, it stays off however short memory is
    trainer = DSFTTrainer(
        model=model,
        args=DSFTConfig(str(tmp_path), **SETTINGS, bf16=False, gradient_checkpointing=False),
        train_dataset=Dataset.from_list(downstream_rows()),
        processing_class=tokenizer,
    )
    assert trainer.args.gradient_checkpointing is False
