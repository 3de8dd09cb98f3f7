"""The user's paths on the command line: `delia demo`, `delia train`, and their bad inputs."""

from __future__ import annotations

import json

import pytest
from conftest import diverse_rows, downstream_rows, write_jsonl

from delia.cli import main
from delia.tiny import save_tiny_model


def test_demo_writes_its_run_folder(tmp_path, capsys):
    output = tmp_path / "demo"
    assert main(["demo", "--output", str(output), "--steps", "12", "--ratio", "2"]) == 0
    for name in ("loss.png", "log_history.json", "delia_mixture.json", "diverse_cache.jsonl", "summary.json"):
        assert (output / name).exists(), name
    assert (output / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["rows"]["downstream"] == 48 and summary["rows"]["diverse"] == 96
    history = json.loads((output / "log_history.json").read_text())
    assert any("loss_downstream" in entry for entry in history) and any("eval_loss" in entry for entry in history)
    printed = capsys.readouterr().out
    assert "loss_downstream" in printed and "eval_loss" in printed and str(output) in printed
    assert main(["demo", "--output", str(output), "--steps", "2"]) == 0  # a delia run folder may be reused


def test_demo_and_train_refuse_bad_input(tmp_path, capsys):
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"not ours")
    assert main(["demo", "--output", str(foreign)]) == 2
    assert "not a delia run" in capsys.readouterr().err
    assert (foreign / "cat.jpg").read_bytes() == b"not ours" and sorted(p.name for p in foreign.iterdir()) == [
        "cat.jpg"
    ]
    with pytest.raises(SystemExit) as error:
        main(["demo", "--ratio", "lots"])
    assert error.value.code == 2 and "lots" in capsys.readouterr().err
    assert main(["train", "--model_name_or_path", "m", "--train_dataset", "t.jsonl", "--no_such_option", "1"]) == 2
    assert "no_such_option" in capsys.readouterr().err
    code = main(
        [
            "train",
            "--model_name_or_path",
            "m",
            "--train_dataset",
            str(tmp_path / "gone.jsonl"),
            "--output_dir",
            str(tmp_path / "run"),
        ]
    )
    assert code == 2 and "gone.jsonl" in capsys.readouterr().err and not (tmp_path / "run").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("model_name_or_path: m\ntrain_dataset: [t.jsonl\n")
    assert main(["train", "--config", str(broken)]) == 2
    assert "broken.yaml" in capsys.readouterr().err  # YAML's own line and column, not a traceback
    full_fine_tuning_8bit = ["--lora_r", "0", "--quantization", "8bit", "--output_dir", str(tmp_path / "run")]
    assert main(["train", "--model_name_or_path", "m", "--train_dataset", "t", *full_fine_tuning_8bit]) == 2
    assert "--lora_r 0" in capsys.readouterr().err and not (tmp_path / "run").exists()
    assert main(["nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err


def test_train_from_a_yaml_recipe_with_command_line_overrides(tmp_path):
    save_tiny_model(tmp_path / "model", "llama2", tie_word_embeddings=False)
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(8))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(40))
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"model_name_or_path: {tmp_path / 'model'}\ntrain_dataset: {train}\ndiverse_dataset: {cache}\n"
        f"diverse_ratio: 260\nlora_r: 4\nlora_alpha: 8\nper_device_train_batch_size: 4\nmax_steps: 2\n"
        f"output_dir: {tmp_path / 'run'}\nreport_to: none\nsave_strategy: 'no'\ngradient_checkpointing: false\n"
    )
    assert main(["train", "--config", str(recipe), "--diverse_ratio", "2"]) == 0  # the command line wins
    mixture = json.loads((tmp_path / "run" / "delia_mixture.json").read_text())
    assert mixture["diverse_ratio"] == 2.0 and mixture["sources"]["diverse"]["rows"] == 16
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()


def test_subclass_example_trains_and_logs_its_metric(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "train_dsft.py"
    result = subprocess.run(
        [sys.executable, str(script), "--steps", "4", "--output", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "format adherence" in result.stdout
    sys.path.insert(0, str(script.parent))
    from train_dsft import follows_format

    assert follows_format("{'thought': 'It invents a date.', 'hallucination': 'yes'}")
    assert not follows_format("{'thought': 'x', 'hallucination': 'maybe'}")
    assert not follows_format("__import__('os').system('true')")  # parsed as a literal, never run
    assert not follows_format("{'thought': '" + "x" * 20_000 + "', 'hallucination': 'no'}")  # over the size limit


def test_reproduce_checkpoint_recipe_parses_to_the_original_settings():
    from pathlib import Path

    from trl import TrlParser

    from delia import DSFTConfig
    from delia.train import ModelArguments

    recipe = Path(__file__).parents[1] / "reproduce_checkpoint" / "recipe.yaml"
    model_args, args = TrlParser((ModelArguments, DSFTConfig)).parse_args_and_config(
        ["--config", str(recipe), "--bf16", "false"]  # the recipe asks for bf16, which this CPU cannot do
    )
    assert model_args.quantization == "8bit" and model_args.new_tokens == ["<sep>"]
    assert (model_args.lora_r, model_args.lora_alpha, model_args.lora_dropout) == (16, 16, 0.05)
    assert model_args.lora_target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert args.learning_rate == 2e-4 and args.num_train_epochs == 1 and args.diverse_ratio == 260
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (16, 4)
    assert args.lr_scheduler_type == "constant_with_warmup" and args.warmup_steps == 25 and args.weight_decay == 0.01
    assert args.completion_only_loss is True


def test_train_under_torchrun_with_two_processes(tmp_path):
    """`delia train` with LoRA and a trainable <sep> under a launcher: DDP on gloo, both ranks exit cleanly."""
    import os
    import subprocess
    import sys

    save_tiny_model(tmp_path / "model", "chatml", tie_word_embeddings=False)
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(8))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(40))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "delia.train", "--model_name_or_path", str(tmp_path / "model")]
    command += ["--train_dataset", str(train), "--diverse_dataset", str(cache), "--diverse_ratio", "3"]
    command += ["--lora_r", "4", "--per_device_train_batch_size", "2", "--max_steps", "3", "--logging_steps", "1"]
    command += ["--output_dir", str(tmp_path / "run"), "--report_to", "none", "--save_strategy", "no"]
    command += ["--gradient_checkpointing", "false", "--use_cpu", "true", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    mixture = json.loads((tmp_path / "run" / "delia_mixture.json").read_text())
    assert mixture["sources"]["diverse"]["rows"] == 24
    assert (tmp_path / "run" / "adapter_model.safetensors").exists()
    assert result.stdout.count("'loss_diverse'") == 3  # only the main process prints its logs, one per step
    # every process logs its mixture fingerprint (the same one, recorded in the run folder); other notes once
    recorded = mixture["fingerprint"]["combined"]
    for rank in (0, 1):
        assert result.stderr.count(f"delia: rank {rank} of 2: mixture fingerprint {recorded}") == 1
    assert result.stderr.count("delia: DELIA mixture: 8 downstream + 24 diverse rows") == 1


def test_delia_command_starts_quietly():
    """`delia --help` in a fresh interpreter prints the usage and nothing on stderr (no third-party import noise)."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "delia.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "delia build-cache" in result.stdout
    assert result.stderr == "", result.stderr
