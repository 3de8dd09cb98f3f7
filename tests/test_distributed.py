"""Two real CPU processes (torchrun, gloo): the same mixture on every rank, per-source and tracked-token losses
combined across ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import diverse_rows, downstream_rows
from datasets import Dataset
from distributed_worker import mixture_hash

from delia import mix_datasets


def test_two_processes_share_the_mixture_and_reduce_per_source_losses(tmp_path):
    worker = Path(__file__).with_name("distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(worker), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
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
    lines = (tmp_path / "token_loss.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["tokens"]["<sep>"]["count"] == 5
