"""The distributed recipes in examples/accelerate/: each config is one accelerate accepts, and the DDP one trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import launch_command_parser
from conftest import diverse_rows, downstream_rows, write_jsonl

from delia.tiny import save_tiny_model

RECIPES = Path(__file__).parents[1] / "examples" / "accelerate"
CONFIGS = sorted(path for path in RECIPES.iterdir() if path.suffix in (".yaml", ".yml", ".json"))
NESTED_PREFIX = {"fsdp_config": "fsdp_", "fp8_config": "fp8_", "dynamo_config": "dynamo_"}


def launch_option_names(config_section: str, keys: list[str]) -> list[str]:
    """The `accelerate launch` options that the keys of a nested section become (as accelerate maps them)."""
    prefix = NESTED_PREFIX.get(config_section, "")
    return [key if key.startswith(prefix) else prefix + key for key in keys]


def test_the_four_recipes_are_there():
    assert [path.name for path in CONFIGS] == [
        "ddp.yaml",
        "deepspeed_zero2.yaml",
        "deepspeed_zero3.yaml",
        "fsdp.yaml",
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_config_parses_and_names_only_keys_accelerate_knows(path):
    # accelerate's own loader refuses unknown top-level keys; nested sections are copied onto the launch options
    # as they are, so a misspelt nested key would be dropped silently: each must be a `accelerate launch` option
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    options = {action.dest for action in launch_command_parser()._actions}
    for section in ("fsdp_config", "deepspeed_config", "fp8_config", "dynamo_config"):
        keys = list(getattr(config, section) or {})
        unknown = sorted(set(launch_option_names(section, keys)) - options)
        assert not unknown, f"{path.name}: {section} keys accelerate does not know: {unknown}"


def test_each_recipe_selects_its_engine():
    loaded = {path.name: load_config_from_file(str(path)) for path in CONFIGS}
    assert loaded["ddp.yaml"].distributed_type.value == "MULTI_GPU"
    assert loaded["fsdp.yaml"].distributed_type.value == "FSDP"
    assert loaded["fsdp.yaml"].fsdp_config["fsdp_version"] == 2
    for name, stage in (("deepspeed_zero2.yaml", 2), ("deepspeed_zero3.yaml", 3)):
        assert loaded[name].distributed_type.value == "DEEPSPEED"
        assert loaded[name].deepspeed_config["zero_stage"] == stage


def test_readme_gives_every_recipe_a_launch_command():
    readme = (RECIPES / "README.md").read_text()
    for path in CONFIGS:
        assert f"accelerate launch --config_file examples/accelerate/{path.name}" in readme, path.name


def test_ddp_recipe_trains_with_two_cpu_processes(tmp_path):
    """The DDP config file itself, through `accelerate launch` (torchrun underneath, gloo on CPU), with LoRA + <sep>."""
    save_tiny_model(tmp_path / "model", "chatml", tie_word_embeddings=False)
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(8))
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows(40))
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(RECIPES / "ddp.yaml")]
    command += ["--num_processes", "2", "--mixed_precision", "no", "-m", "delia.train"]
    command += ["--model_name_or_path", str(tmp_path / "model"), "--train_dataset", str(train)]
    command += ["--diverse_dataset", str(cache), "--diverse_ratio", "3", "--lora_r", "4"]
    command += ["--per_device_train_batch_size", "2", "--max_steps", "2", "--logging_steps", "1"]
    command += ["--output_dir", str(tmp_path / "run"), "--report_to", "none", "--save_strategy", "no"]
    command += ["--gradient_checkpointing", "false", "--use_cpu", "true", "--disable_tqdm", "true"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    mixture = json.loads((tmp_path / "run" / "delia_mixture.json").read_text())
    rows = mixture["sources"]["downstream"]["rows"] + mixture["sources"]["diverse"]["rows"]
    assert rows == 32 and (tmp_path / "run" / "adapter_model.safetensors").exists()
    # 2 steps x 2 rows x 2 processes: the final epoch fraction counts both processes' rows
    assert f"'epoch': '{2 * 2 * 2 / rows:.4g}'" in result.stdout, result.stdout[-2000:]


ZERO3_PROBE = """
import json, sys
import deepspeed, torch
from transformers import AutoModelForCausalLM
from transformers.integrations import HfDeepSpeedConfig
from delia import setup_tokenizer_and_model

deepspeed.init_distributed(dist_backend="gloo")
keep = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
shard_rows = AutoModelForCausalLM.from_pretrained(sys.argv[1]).get_input_embeddings().weight.shape[0]
tokenizer, model = setup_tokenizer_and_model(sys.argv[1], quantization=None)
weight = model.get_input_embeddings().weight
with deepspeed.zero.GatheredParameters([weight]):
    full = weight.detach().clone()
sep = tokenizer.convert_tokens_to_ids("<sep>")
mean = full[:sep].mean(dim=0)
print(json.dumps({"shard_rows": shard_rows, "sep_is_mean": bool(torch.allclose(full[sep], mean, atol=1e-6))}))
"""


def test_new_token_rows_are_set_when_deepspeed_zero3_partitions_the_model(tmp_path):
    """Under ZeRO-3 the model loads partitioned (each process holds an empty shard): <sep> still gets the mean row."""
    pytest.importorskip("deepspeed")
    save_tiny_model(tmp_path / "model", "chatml", tie_word_embeddings=False)
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    env["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    result = subprocess.run(
        [sys.executable, "-c", ZERO3_PROBE, str(tmp_path / "model")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    assert probe["shard_rows"] == 0  # the situation under test: the loaded embedding is an empty shard
    assert probe["sep_is_mean"]
