"""What the phases share: sizes (GPU and dry-run), model shapes, the bundled data, random models, timers."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]  # the repository root
TRAIN_ROWS = ROOT / "reproduce_checkpoint" / "train_dataset.jsonl"  # the 129 bundled <sep> rows
EVAL_ROWS = ROOT / "reproduce_checkpoint" / "eval_dataset.jsonl"  # the 30 eval rows (unseen phrasings)
QUERIES = ROOT / "reproduce_self_sample" / "query_cache.jsonl"  # the 240 bundled general queries
HELD_OUT = files("delia") / "demo_data" / "queries.jsonl"  # the 128 general queries delia eval holds out

#: Llama-architecture shapes built with random weights on the machine (no weights travel).
SHAPES: dict[str, dict[str, int]] = {
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 32000,
    },  # TinyLlama-1.1B's shape
    "7b": {
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 32000,
    },  # Llama-2-7B's shape
    "dry-1b": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 512,
    },
    "dry-7b": {
        "hidden_size": 96,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "vocab_size": 512,
    },
}


@dataclass
class Sizes:
    """Every size the phases use; `gpu_sizes()` for the H200, `dry_sizes()` for the CPU dry run."""

    matmul_n: int = 8192
    copy_mib: int = 2048
    small_model: str = "1b"
    big_model: str = "7b"
    quantizations: list[str] = field(default_factory=lambda: ["bf16", "8bit", "4bit"])
    cuda_steps: int = 20
    cuda_batch: int = 8
    cuda_ratio: float = 4.0
    eval_limit: int = 4
    eval_new_tokens: int = 32
    cache_queries: int = 32
    cache_new_tokens: int = 32
    overhead_rounds: int = 2
    overhead_steps: int = 12
    overhead_warmup: int = 3
    batch: int = 16  # the original recipe's batch shape: 16 rows x 4 accumulation
    accumulation: int = 4
    seq_1b: int = 512
    seq_7b: int = 256
    throughput_steps: int = 3  # the first is dropped
    decode_tokens: int = 64
    decode_batch1_queries: int = 4
    decode_batches: list[int] = field(default_factory=lambda: [16, 64, 256])
    compile_variant: bool = True
    regime_ratio: float = 260.0
    regime_train_rows: int = 100  # the paper's 100 downstream rows: 100 x 261 = 26,100 rows in one epoch
    regime_cache_new_tokens: int = 128
    regime_gen_batch: int = 512
    regime_batch: int = 64  # the recipe's 64 rows per optimizer step, as 64 x 1 (same effective batch)
    regime_accumulation: int = 1
    regime_eval_limit: int | None = None  # all 30 eval rows
    regime_eval_new_tokens: int = 96
    regime_general_queries: int | None = None  # all 128 held-out general queries
    regime_probe_limit: int | None = 16  # the probe loads each model on the CPU (run_probe does not place it)
    regime_gen_share: float = 0.4  # of the regime's time left after the base evaluation
    regime_reserve_s: float = 120.0  # kept after DELIA's training for both SFT runs, the evaluations and the probe
    dtype: str = "bfloat16"
    estimate_scale: float = 1.0  # time estimates (given for the H200) are multiplied by this


def gpu_sizes() -> Sizes:
    return Sizes()


def dry_sizes() -> Sizes:
    """Tiny sizes: every phase's code runs on a CPU in well under a minute each."""
    return Sizes(
        matmul_n=256,
        copy_mib=16,
        small_model="dry-1b",
        big_model="dry-7b",
        quantizations=["bf16", "8bit", "4bit"],
        cuda_steps=4,
        cuda_batch=4,
        eval_limit=2,
        eval_new_tokens=4,
        cache_queries=4,
        cache_new_tokens=4,
        overhead_rounds=2,
        overhead_steps=3,
        overhead_warmup=1,
        batch=2,
        accumulation=2,
        seq_1b=32,
        seq_7b=32,
        throughput_steps=2,
        decode_tokens=4,
        decode_batch1_queries=2,
        decode_batches=[4, 8],
        compile_variant=False,
        regime_train_rows=2,
        regime_cache_new_tokens=4,
        regime_gen_batch=64,
        regime_batch=64,
        regime_eval_limit=2,
        regime_eval_new_tokens=4,
        regime_general_queries=4,
        regime_probe_limit=2,
        regime_reserve_s=30.0,
        dtype="float32",
        estimate_scale=0.1,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Data


def read_jsonl(path: Any, limit: int | None = None) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    return rows[:limit] if limit is not None else rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def cache_queries(path: Path) -> Path:
    """The bundled general queries that delia eval does not hold out (112): what the model self-samples from."""
    held_out = {row["messages"][0]["content"] for row in read_jsonl(HELD_OUT)}
    return write_jsonl(path, [row for row in read_jsonl(QUERIES) if row["messages"][0]["content"] not in held_out])


def long_text_rows(count: int, words: int, seed: int) -> list[dict[str, str]]:
    """`{"text": ...}` rows of `words` words drawn from the bundled queries: long enough to fill any max_length."""
    import random

    vocabulary = " ".join(row["messages"][0]["content"] for row in read_jsonl(QUERIES)).split()
    rng = random.Random(seed)
    return [{"text": " ".join(rng.choices(vocabulary, k=words))} for _ in range(count)]


# ----------------------------------------------------------------------------------------------------------------------
# Models


def linear_params(shape: dict[str, int]) -> int:
    """Weights in the matrix products of a Llama of `shape` (attention, MLP and LM head; not the input embedding)."""
    h, layers, heads = shape["hidden_size"], shape["num_hidden_layers"], shape["num_attention_heads"]
    kv = h * shape["num_key_value_heads"] // heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * shape["intermediate_size"]
    return layers * per_layer + h * shape["vocab_size"]


def train_flops_per_token(shape: dict[str, int], seq: int) -> float:
    """Model FLOPs of one trained token: 6 x matrix weights + causal attention 6 x layers x hidden x seq.

    The PaLM convention: recomputation under gradient checkpointing is not counted, and frozen LoRA bases are counted
    as if trained, so MFU compares configurations on the same footing.
    """
    return 6.0 * linear_params(shape) + 6.0 * shape["num_hidden_layers"] * shape["hidden_size"] * seq


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_llama(folder: Path, shape_name: str, device: str, dtype_name: str) -> dict[str, Any]:
    """A randomly initialised Llama of `SHAPES[shape_name]`, built on `device`, saved with a tiny ChatML tokenizer.

    The tokenizer (delia.tiny's BPE, a few hundred ids) uses the low ids of the model's vocabulary; `<sep>` then gets
    a row that already exists, which `setup_tokenizer_and_model` initialises like any new token.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from delia.tiny import build_tiny_tokenizer

    shape = SHAPES[shape_name]
    tokenizer = build_tiny_tokenizer("chatml")
    config = LlamaConfig(
        **shape,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    with default_dtype(dtype), torch.device(device):
        model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    parameters = sum(p.numel() for p in model.parameters())
    del model
    empty_cache()
    return {"parameters": parameters, "folder": str(folder)}


def load_kwargs(device: str) -> dict[str, Any]:
    """`model_kwargs` that put an unquantized model straight on the GPU (setup_tokenizer_and_model leaves it on CPU)."""
    return {"device_map": {"": 0}} if device == "cuda" else {}


def empty_cache() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def synchronize() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory_gib(reset: bool = False) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    value = torch.cuda.max_memory_allocated() / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def seconds_since(start: float) -> float:
    return time.perf_counter() - start


def ceil_div(a: float, b: float) -> int:
    return int(math.ceil(a / b))
