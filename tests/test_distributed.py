"""Two real CPU processes (torchrun, gloo) against one: the same mixture on every rank, and the same model.

The 2-process run takes 2 rows per process per step, the 1-process run 4: the same global batch. accelerate's
`prepare` turns the Trainer's RandomSampler into a `SeedableRandomSampler` seeded from `args.seed` (the same
permutation on every process and in every run) and wraps the batch sampler in a `BatchSamplerShard`, which gives
process r the batches r, r + 2, ...: step k takes permutation rows 4k..4k+3 either way. Each process divides its
summed token losses by the token count of the whole global batch (transformers gathers it across processes,
`average_tokens_across_devices`) and multiplies by the number of processes, which DDP's gradient averaging undoes:
the losses agree exactly, the adapters up to the order of float sums in the gradient all-reduce (we saw at most
3e-7). LoRA dropout is 0 here: with dropout the masks would differ (each process draws its own for its 2 rows, the
single process one for all 4), a difference of random masks, not of data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import diverse_rows, downstream_rows, write_jsonl
from datasets import Dataset
from distributed_worker import mixture_hash, run
from safetensors.torch import load_file

from delia import mix_datasets, prepare_datasets
from delia.data.fingerprint import mixture_fingerprint


def test_two_processes_train_the_model_one_process_trains(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows())
    cache = write_jsonl(tmp_path / "cache.jsonl", diverse_rows())
    short = write_jsonl(tmp_path / "short.jsonl", diverse_rows()[:-1])  # one node's copy lost its last line
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker)]
    command += [str(tmp_path / "two"), str(train), str(cache), "--batch-size", "2", "--other-cache", str(short)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / "two" / f"rank{i}.json").read_text()) for i in range(2)]
    assert all(rank["world_size"] == 2 for rank in ranks)

    # the same rows in the same order on every process, and the same as a single-process mix with that seed
    expected = mixture_hash(
        mix_datasets(Dataset.from_list(downstream_rows()), Dataset.from_list(diverse_rows()), ratio=1, seed=0)
    )
    assert ranks[0]["order"] == ranks[1]["order"] == expected

    # each rank trains on other rows, so identical per-source values on both mean they were reduced across ranks
    assert len(ranks[0]["logs"]) == len(ranks[1]["logs"]) == 3
    for first, second in zip(ranks[0]["logs"], ranks[1]["logs"], strict=True):
        for key in ("loss", "loss_downstream", "loss_diverse"):
            if key in first or key in second:
                assert first[key] == second[key], key
    assert any("loss_downstream" in entry and "loss_diverse" in entry for entry in ranks[0]["logs"])

    # tracked-token loss: the same on both ranks, equal to one process scoring each eval row once (the rows repeated
    # to fill the last batch are not counted), and one JSONL line written, by the main process only
    for token in ("<sep>", "'"):
        assert ranks[0]["eval"][f"eval_token_loss/{token}"] == ranks[1]["eval"][f"eval_token_loss/{token}"]
        assert ranks[0]["eval"][f"eval_token_loss/{token}"] == pytest.approx(ranks[0]["reference"][token], rel=1e-5)
    lines = (tmp_path / "two" / "token_loss.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["tokens"]["<sep>"]["count"] == 5

    # one process with the whole global batch: the same fingerprint, losses and adapter
    torch.manual_seed(1)  # whatever the test process's RNG holds, the run seeds itself
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process (OMP_NUM_THREADS=1); two threads crawl on 2 shared cores
    try:
        one = run(str(tmp_path / "one"), str(train), str(cache), batch_size=4)
    finally:
        torch.set_num_threads(threads)
    fingerprint = one["fingerprint"]["combined"]
    assert ranks[0]["fingerprint"]["combined"] == ranks[1]["fingerprint"]["combined"] == fingerprint
    recorded = json.loads((tmp_path / "two" / "delia_mixture.json").read_text())["fingerprint"]
    checkpoint = json.loads((tmp_path / "two" / "checkpoint-3" / "delia_checkpoint.json").read_text())
    assert recorded["combined"] == checkpoint["mixture"]["fingerprint"]["combined"] == fingerprint
    assert f"rank 0 of 2: mixture fingerprint {fingerprint}" in result.stderr
    assert f"rank 1 of 2: mixture fingerprint {fingerprint}" in result.stderr
    for alone, shared in zip(one["logs"], ranks[0]["logs"], strict=True):
        for key in ("loss", "loss_downstream", "loss_diverse"):
            assert alone[key] == pytest.approx(shared[key], rel=1e-6), key
    adapter_one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    adapter_two = load_file(tmp_path / "two" / "adapter" / "adapter_model.safetensors")
    assert adapter_one.keys() == adapter_two.keys() and any("trainable_tokens" in key for key in adapter_one)
    for key, weights in adapter_one.items():
        torch.testing.assert_close(adapter_two[key], weights, rtol=0, atol=1e-5, msg=key)
    assert any(weights.abs().max() > 1e-3 for key, weights in adapter_one.items() if "lora_B" in key)  # it trained

    # only the main process writes delia's files
    assert ranks[0]["written"] == ["delia_mixture.json", "delia_checkpoint.json"] and ranks[1]["written"] == []

    # a rank that reads another cache stops every rank before training, naming the ranks and their fingerprints
    theirs = mixture_fingerprint(prepare_datasets(str(train), str(short), ratio=1, seed=0), str(train), str(short))
    assert ranks[0]["mismatch"] == ranks[1]["mismatch"]
    message = ranks[0]["mismatch"]
    assert f"rank 0: {fingerprint[:16]}" in message and f"rank 1: {theirs['combined'][:16]}" in message
    assert str(short) in message and "nothing was trained" in message
    assert not (tmp_path / "two" / "mismatch").exists()
