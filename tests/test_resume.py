"""Killed and resumed: a `delia train` run killed with SIGKILL after a checkpoint ends, once resumed with `--resume`,
where an uninterrupted run ends; a resume onto other data is refused unless allowed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import diverse_rows, downstream_rows, write_jsonl
from safetensors.torch import load_file

from delia import prepare_datasets
from delia.cli import main
from delia.data.fingerprint import mixture_fingerprint
from delia.run_files import CHECKPOINT_RECORD, MIXTURE_FILE
from delia.tiny import save_tiny_model

LOSSES = ("loss", "loss_downstream", "loss_diverse")
REPOSITORY = Path(__file__).parents[1]


@pytest.fixture(autouse=True)
def one_thread():
    """Train on one thread, as the killed subprocess does (OMP_NUM_THREADS=1): on a shared 2-core machine two torch
    threads per process wait on each other, and the float sums are then done in the same order in both."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_files(tmp_path) -> dict[str, Path]:
    """A tiny saved model, the downstream rows and a cache, as `delia train` reads them."""
    return {
        "model": save_tiny_model(tmp_path / "model", "llama2", tie_word_embeddings=False),
        "train": write_jsonl(tmp_path / "train.jsonl", downstream_rows(8)),
        "cache": write_jsonl(tmp_path / "cache.jsonl", diverse_rows(40)),
    }


def train_options(files: dict[str, Path], output_dir: Path, steps: int, save_steps: int) -> list[str]:
    options = ["--model_name_or_path", str(files["model"]), "--train_dataset", str(files["train"])]
    options += ["--diverse_dataset", str(files["cache"]), "--diverse_ratio", "3", "--lora_r", "4", "--lora_alpha", "8"]
    options += ["--per_device_train_batch_size", "4", "--max_steps", str(steps), "--logging_steps", "1"]
    options += ["--save_steps", str(save_steps), "--learning_rate", "1e-2", "--output_dir", str(output_dir)]
    options += ["--report_to", "none", "--gradient_checkpointing", "false", "--disable_tqdm", "true"]
    return options  # LoRA dropout stays on (0.05): the resumed run must also restore the RNG state


def step_logs(checkpoint: Path) -> dict[int, dict]:
    history = json.loads((checkpoint / "trainer_state.json").read_text())["log_history"]
    return {entry["step"]: entry for entry in history if "loss" in entry}


def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(tmp_path, run_files, capsys):
    steps = 40
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "delia.train", *train_options(run_files, killed, steps, save_steps=4)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would stall the run while we poll
    with open(log, "w") as output:
        process = subprocess.Popen(command, env=env, cwd=REPOSITORY, stdout=output, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not list(killed.glob(f"checkpoint-*/{CHECKPOINT_RECORD}")):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert not (killed / "adapter_model.safetensors").exists() and not (killed / f"checkpoint-{steps}").exists()

    full = tmp_path / "full"
    assert main(["train", *train_options(run_files, full, steps, save_steps=4)]) == 0
    assert main(["train", *train_options(run_files, killed, steps, save_steps=4), "--resume"]) == 0
    assert "no checkpoint" not in capsys.readouterr().err

    # the same losses at every step, the restored steps included, and the same adapter
    resumed, uninterrupted = step_logs(killed / f"checkpoint-{steps}"), step_logs(full / f"checkpoint-{steps}")
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, steps + 1))
    for step, entry in uninterrupted.items():
        for key in LOSSES:
            assert resumed[step].get(key) == pytest.approx(entry.get(key), rel=1e-5), (step, key)
    adapter_resumed = load_file(killed / "adapter_model.safetensors")
    adapter_full = load_file(full / "adapter_model.safetensors")
    for key, weights in adapter_full.items():
        torch.testing.assert_close(adapter_resumed[key], weights, rtol=0, atol=1e-5, msg=key)

    # the mixture was rebuilt identically: every checkpoint records the fingerprint of the uninterrupted run
    fingerprint = json.loads((full / MIXTURE_FILE).read_text())["fingerprint"]
    for record in killed.glob(f"checkpoint-*/{CHECKPOINT_RECORD}"):
        assert json.loads(record.read_text())["mixture"]["fingerprint"] == fingerprint


def test_resuming_onto_other_data_is_refused_unless_allowed(tmp_path, run_files, capsys):
    run = tmp_path / "run"
    options = train_options(run_files, run, steps=2, save_steps=2)
    assert main(["train", *options, "--resume"]) == 0
    assert capsys.readouterr().err.count(f"no checkpoint in {run} yet; training from the start") == 1
    checkpoint = run / "checkpoint-2"
    assert (checkpoint / CHECKPOINT_RECORD).exists()
    mixture = (run / MIXTURE_FILE).read_bytes()
    then = json.loads(mixture)["fingerprint"]["combined"]

    # a checkpoint that a kill left half-written (no record yet) is skipped by --resume, refused when named
    partial = run / "checkpoint-4"
    partial.mkdir()
    (partial / "trainer_state.json").write_text("{")
    assert main(["train", *options, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "Skipping checkpoint-4" in err and f"{checkpoint} reached max_steps (2): nothing left to train" in err
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert main(["train", *options, "--resume_from_checkpoint", str(partial)]) == 2
    err = capsys.readouterr().err
    assert f"{partial} has no {CHECKPOINT_RECORD}" in err and "allow_mixture_change" in err
    (partial / "trainer_state.json").unlink()
    partial.rmdir()

    # the cache changed since the checkpoint: one line naming both fingerprints; the run folder keeps its record
    write_jsonl(run_files["cache"], diverse_rows(41))
    assert main(["train", *options, "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    line = next(line for line in err if line.startswith("delia train: error:"))
    prepared = prepare_datasets(str(run_files["train"]), str(run_files["cache"]), ratio=3, seed=42)
    now = mixture_fingerprint(prepared, str(run_files["train"]), str(run_files["cache"]))["combined"]
    assert f"fingerprint {then[:16]} then, {now[:16]} now" in line and str(checkpoint) in line
    assert "the diverse cache differs" in line and "the downstream file" not in line
    assert (run / MIXTURE_FILE).read_bytes() == mixture and sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-2"
    ]

    # a checkpoint of another run (another ratio) is refused the same way
    other = tmp_path / "other"
    other_options = train_options(run_files, other, steps=2, save_steps=2)
    other_options[other_options.index("--diverse_ratio") + 1] = "2"
    assert main(["train", *other_options]) == 0
    assert main(["train", *other_options, "--resume_from_checkpoint", str(checkpoint)]) == 2
    assert "was trained on another mixture" in capsys.readouterr().err

    # the explicit override resumes anyway, with a warning, and then records the new mixture
    assert main(["train", *options, "--resume", "--allow_mixture_change", "true", "--max_steps", "3"]) == 0
    assert "Resuming although" in capsys.readouterr().err and (run / "checkpoint-3" / CHECKPOINT_RECORD).exists()
    assert json.loads((run / MIXTURE_FILE).read_text())["fingerprint"]["combined"] != then
    assert main(["train", *options, "--resume", "--resume_from_checkpoint", str(checkpoint)]) == 2
    assert "not both" in capsys.readouterr().err
