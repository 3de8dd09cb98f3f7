"""delia's thread policy for CPU generation, evaluation and the probe: the free cores, looked up before each batch."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

import delia.cpu
from delia.cpu import OtherLoad, thread_count, threads_while
from delia.generation import SamplingConfig
from delia.generation.prompts import build_conversation
from delia.generation.transformers_backend import TransformersBackend
from delia.tiny import build_tiny_model, build_tiny_tokenizer


def test_other_programs_busy_cores_are_measured_without_this_process(tmp_path):
    spinner = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 20\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.5)  # the child is running
        watch = OtherLoad()
        first = watch.cores()  # a fresh 0.1 s look
        time.sleep(1.5)
        busy = watch.cores()  # the 1.5 s since

    finally:
        spinner.kill()
        spinner.wait(timeout=10)
    assert busy is not None and busy >= 0.5 and first is not None and first >= 0.3  # one spinning process: a core
    watch = OtherLoad()
    watch.cores()
    end = time.monotonic() + 1.0
    while time.monotonic() < end:  # this process's own work does not count as other programs' load
        sum(range(1000))
    own = watch.cores()
    assert own is not None and own < busy


def test_thread_count_follows_the_setting_and_the_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(delia.cpu, "usable_cores", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert thread_count(None, busy_elsewhere=0.0) == 2
    assert thread_count(None, busy_elsewhere=2.0) == 1  # both cores busy elsewhere: one thread, never zero
    assert thread_count(3) == 3 and thread_count(0) is None
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert thread_count(None) is None  # the user's OMP_NUM_THREADS stands


def test_each_generation_batch_runs_with_the_policys_threads_and_restores_them(monkeypatch):
    tokenizer = build_tiny_tokenizer("llama2")
    model = build_tiny_model(tokenizer).eval()
    seen: list[int] = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: (seen.append(torch.get_num_threads()), generate(**kw))[1])
    before = torch.get_num_threads()
    backend = TransformersBackend(model, tokenizer, batch_size=2, cpu_threads=1)
    conversations = [build_conversation(f"Question {i}?", None, "plain", None) for i in range(5)]
    replies = backend.generate(conversations, SamplingConfig(max_new_tokens=3, temperature=0.0))
    assert len(replies) == 5 and seen == [1, 1, 1] and torch.get_num_threads() == before
    seen.clear()
    TransformersBackend(model, tokenizer, batch_size=5, cpu_threads=0).generate(conversations, SamplingConfig(3))
    assert seen == [before]  # 0: torch's own setting


@pytest.mark.parametrize("device", ["cpu", torch.device("cpu"), "cuda"])
def test_threads_change_only_for_cpu_work(device, monkeypatch):
    monkeypatch.setattr(delia.cpu, "free_threads", lambda busy_elsewhere=None: 1)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    with threads_while(None, device):
        inside = torch.get_num_threads()
    assert inside == (before if device == "cuda" else 1) and torch.get_num_threads() == before


def test_measured_load_already_counts_the_launchs_other_processes(monkeypatch):
    monkeypatch.setattr(delia.cpu, "usable_cores", lambda: 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 16)
    # four ranks on 16 cores, the three others busy on 12 of them: this rank's share is 4, not (16 - 12) // 4 = 1
    assert delia.cpu.free_threads(local_processes=4, busy_elsewhere=12.0) == 4
    assert delia.cpu.free_threads(local_processes=4, busy_elsewhere=15.0) == 1
