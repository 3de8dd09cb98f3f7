"""
Self-sampling throughput on a CPU with a real model: generated tokens/s of `build_cache` (transformers backend) on
SmolLM2-135M-Instruct, in float32 (what delia loads on a CPU) against bf16 weights, a static KV cache, and a static
cache with torch.compile.

What is measured: generated tokens per second inside `build_cache` (the `tokens` and `seconds` counts of
`<output>.meta.json`, which include rendering, tokenizing and writing the rows), greedy with min_new_tokens =
max_new_tokens, so every configuration generates exactly the same number of tokens. The queries are the first
--queries of the bundled query cache (reproduce_self_sample/query_cache.jsonl), reference template, the default
system prompt, batches of --batch-size sorted by prompt length, as `delia build-cache` runs by default.

Configurations (each loads the model once, runs once untimed on a few queries to warm up, compiling where asked):
    float32   the model as `delia build-cache` loads it on a CPU (float32, dynamic KV cache)
    bf16      --dtype bfloat16: weights and activations in bf16
    static    float32 with generation_config.cache_implementation="static"
    compile   bf16 + static cache + torch.compile of the forward (transformers' CompileConfig, allowed on CPU)
The configurations take turns, one whole `build_cache` call each, for --rounds rounds; the figure is the median.
All of them run with the thread count delia trains with (`delia.cpu.free_threads`). Each line names the
configuration, its median tokens/s and its ratio to float32; the last line is the best ratio.

    python benchmarks/cpu_generation.py
    python benchmarks/cpu_generation.py --configs float32,bf16 --rounds 5

With --background_load N, it measures instead how self-sampling holds up beside N busy processes (each a Python loop
that keeps one core busy, started by the benchmark and killed after): float32, in each round a quiet run and a
loaded run with delia's thread policy (the cores other programs leave free, looked up before each batch), then a
loaded run at torch's own thread count (what generation used before the policy). The last line is
`loaded_vs_quiet=<x>`: tokens/s under load with the policy / tokens/s quiet, medians over the rounds, in one run.

    python benchmarks/cpu_generation.py --background_load 2 --new-tokens 24
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from harness import BUNDLED_QUERY_CACHE, announce_delia, quiet, rotated

from delia.build_cache import build_cache
from delia.cpu import free_threads
from delia.modeling import load_tokenizer_and_model
from delia.models import resolve_model

CONFIGS = ("float32", "bf16", "static", "compile")
# greedy; a fresh output each call; every row kept (a degenerate reply still cost its tokens); no progress bar
EVERY_CALL = dict(temperature=0.0, resume=False, overwrite=True, keep_degenerate=True, progress=False)


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="short name, folder or hub name")
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32, help="min_new_tokens = max_new_tokens")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from {', '.join(CONFIGS)}")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: delia's choice for training)")
    parser.add_argument(
        "--background_load", "--background-load", type=int, default=0, help="busy processes beside the generation"
    )
    args = parser.parse_args(argv)
    args.configs = args.configs.split(",")
    assert set(args.configs) <= set(CONFIGS) and "float32" in args.configs, (
        f"--configs must name float32 and some of {CONFIGS}"
    )
    return args


def load(model_path: str, config: str):
    """(tokenizer, model) set up for one configuration."""
    tokenizer, model = load_tokenizer_and_model(
        model_path, dtype="bfloat16" if config in ("bf16", "compile") else "float32", device="cpu"
    )
    if config in ("static", "compile"):
        model.generation_config.cache_implementation = "static"
    if config == "compile":
        model.generation_config.compile_config = transformers.CompileConfig(dynamic=False)
        model.generation_config.compile_config._compile_all_devices = True  # transformers compiles on GPUs only else
    return tokenizer, model.eval()


def sample(
    args: argparse.Namespace, tokenizer, model, output: str, limit: int, cpu_threads: int | None = None
) -> tuple[int, float]:
    """One build_cache call on the first `limit` bundled queries; returns (generated tokens, seconds)."""
    # min = max new tokens: every query costs the same in every configuration
    sizes = dict(batch_size=args.batch_size, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    sizes["cpu_threads"] = cpu_threads
    build_cache(model, str(BUNDLED_QUERY_CACHE), output, tokenizer=tokenizer, limit=limit, **sizes, **EVERY_CALL)
    counts = json.loads(Path(f"{output}.meta.json").read_text())["counts"]
    return counts["tokens"], counts["seconds"]


def measure(args: argparse.Namespace, model_path: str) -> dict[str, list[float]]:
    """Every configuration loaded and warmed up, then --rounds rounds in rotating order; tokens/s of each call."""
    configs = args.configs
    rates: dict[str, list[float]] = {config: [] for config in configs}
    with tempfile.TemporaryDirectory() as workdir:
        loaded = {}
        for config in configs:
            started = time.perf_counter()
            loaded[config] = load(model_path, config)
            sample(args, *loaded[config], os.path.join(workdir, f"warmup-{config}.jsonl"), limit=args.batch_size)
            print(f"{config}: loaded and warmed up in {time.perf_counter() - started:.1f} s")
        for round_index in range(args.rounds):
            for config in rotated(configs, round_index):
                output = os.path.join(workdir, f"{config}.jsonl")
                tokens, seconds = sample(args, *loaded[config], output, limit=args.queries)
                if tokens != args.queries * args.new_tokens:
                    raise SystemExit(
                        f"FAIL: {config} generated {tokens} tokens, expected {args.queries * args.new_tokens}"
                    )
                rates[config].append(tokens / seconds)
            print(f"round {round_index + 1}: " + ", ".join(f"{c} {rates[c][-1]:.1f}" for c in configs) + " tokens/s")
    return rates


@contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """`count` Python processes that each keep a core busy meanwhile (bounded: each ends by itself after 30 min)."""
    loop = "import time\nend = time.time() + 1800\nwhile time.time() < end: pass"
    children = [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(count)]
    try:
        time.sleep(1.0)  # running before the generation starts
        yield
    finally:
        for child in children:
            child.kill()
            child.wait(timeout=30)


def measure_under_load(args: argparse.Namespace, model_path: str) -> None:
    """Quiet vs loaded tokens/s with delia's thread policy, and loaded at torch's own threads; `loaded_vs_quiet` last."""
    rates: dict[str, list[float]] = {"quiet, policy": [], "loaded, policy": [], "loaded, torch threads": []}
    torch_threads = torch.get_num_threads()
    tokenizer, model = load(model_path, "float32")
    with tempfile.TemporaryDirectory() as workdir:
        output = os.path.join(workdir, "cache.jsonl")
        sample(args, tokenizer, model, output, limit=args.batch_size)  # warm-up
        for round_index in range(args.rounds):
            rates["quiet, policy"].append(rate(sample(args, tokenizer, model, output, args.queries)))
            with busy_processes(args.background_load):
                rates["loaded, policy"].append(rate(sample(args, tokenizer, model, output, args.queries)))
                fixed = sample(args, tokenizer, model, output, args.queries, cpu_threads=torch_threads)
                rates["loaded, torch threads"].append(rate(fixed))
            print(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()) + " tokens/s")
    medians = {name: statistics.median(values) for name, values in rates.items()}
    for name, median in medians.items():
        print(f"{name:<22} {median:8.1f} tokens/s  x{median / medians['quiet, policy']:.2f} of quiet")
    print(f"policy_vs_torch_threads_under_load={medians['loaded, policy'] / medians['loaded, torch threads']:.2f}")
    print(f"loaded_vs_quiet={medians['loaded, policy'] / medians['quiet, policy']:.2f}")


def rate(sampled: tuple[int, float]) -> float:
    """Tokens per second of one `sample` call."""
    tokens, seconds = sampled
    return tokens / seconds


def main(argv: list[str] | None = None) -> None:
    """The configurations in turn; prints each one's median tokens/s and ratio to float32, `best=` last."""
    args = parse_arguments(argv)
    quiet()
    if args.background_load:
        announce_delia()
        model_path = resolve_model(args.model)
        print(
            f"model {args.model} ({model_path}), float32; {args.queries} queries, batch {args.batch_size}, "
            f"{args.new_tokens} new tokens each; {args.rounds} rounds; {args.background_load} busy processes; "
            f"torch threads {torch.get_num_threads()} on {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}"
        )
        measure_under_load(args, model_path)
        return
    torch.set_num_threads(args.threads or free_threads())
    announce_delia()
    model_path = resolve_model(args.model)
    print(
        f"model {args.model} ({model_path}); {args.queries} queries, batch {args.batch_size}, {args.new_tokens} new "
        f"tokens each; {args.rounds} rounds; torch threads {torch.get_num_threads()}; load average "
        f"{os.getloadavg()[0]:.1f}"
    )
    rates = measure(args, model_path)
    baseline = statistics.median(rates["float32"])
    ratios = {}
    for config in args.configs:
        median = statistics.median(rates[config])
        ratios[config] = median / baseline
        print(f"{config:<8} {median:8.1f} tokens/s  x{ratios[config]:.2f} of float32")
    best = max((c for c in args.configs if c != "float32"), key=ratios.get, default="float32")
    print(f"best={best} ratio={ratios[best]:.2f}")


if __name__ == "__main__":
    main()
