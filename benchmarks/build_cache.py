"""
Generation throughput of build_cache (transformers backend, CPU): one query at a time against batches of 32, and
batches in file order against batches sorted by prompt length, on prompts of skewed length.

What is measured: generated tokens per second of a whole `build_cache` call, as a user sees it: the `tokens` and
`seconds` counts of the returned `CacheResult` (as in `<output>.meta.json`; `seconds` runs from the start of the call,
so it includes loading the model from its folder, reading the queries, rendering and tokenizing the prompts, and
writing the rows; on this tiny model that is under a tenth of a second per call). The time spent generating, inside `TransformersBackend.stream`, is
printed too (the benchmark wraps that method with a timer; nothing else changes), so the fixed cost of a call can be
seen apart.

The three configurations, all greedy (temperature=0) with min_new_tokens = max_new_tokens (32 by default), so every
query costs exactly the same number of generated tokens in each (checked from the counts: every run must report
queries x new tokens, all with finish_reason "length"):
    sequential  batch_size=1 (sort_by_length=False; with one query per batch the order changes nothing)
    unsorted    batch_size=32, sort_by_length=False: batches in file order, and the file is shuffled with a fixed
                seed, so long and short prompts share batches and each batch is left-padded to its longest prompt
    sorted      batch_size=32, sort_by_length=True: build_cache orders the queries longest prompt first
The sequential configuration is slow, so it answers a subset (--sequential-queries, 64 of the 256 by default), picked
as every k-th query in order of prompt length, so its length distribution matches the full set (both means are
printed). Tokens per second is a rate, and the per-query cost at batch size 1 depends on the prompt length only.

Model and prompts: a tiny Llama (delia.tiny, hidden 256 x 4 layers by default, 2.5M parameters, float32) saved with
save_pretrained to a temporary folder, which build_cache loads by path like a user's model. At this size, on one
core, the prefill of 32 prompts of 440 tokens takes about 1.5 s of matrix products, and a decode step at batch 32 takes
about 5 ms on short prompts and 15-20 ms on long ones, where a whole step at batch size 1 takes about 2 ms, nearly all
of it the per-step Python overhead of `generate`: compute dominates the batched runs, overhead the sequential one.
Hidden 512 has four times the compute per token (that prefill took 5 s) and makes a round several times longer.
Prompts use template="plain" and system_prompt=None, so the prompt is the chat template around the query and nothing
else; the query text is cut so the rendered prompt has a length drawn from a log-normal distribution (median
--median-length, sigma --sigma, clipped to 24 .. --max-length tokens; 24 is the template's 16 tokens, the query's
index and a few words): most prompts are short, one in ten is over three times the median, the longest ten times it. The lengths printed are those of the prompts as the backend tokenizes them. Queries are rows
{"messages": [user, assistant]} in a JSONL file; each starts with its index, so no two are the same (build_cache drops
repeated queries).

Alternation: other jobs may share the machine, so the three configurations take turns, one whole build_cache call
each, for --rounds rounds, the order rotating each round; every call writes a fresh output file. The table shows the
median over rounds; the last two lines are ratios of those medians. Before the rounds, each configuration runs once on
a few queries, untimed (first-call set-up inside torch, transformers and datasets).

Threads: torch uses one thread by default here (--threads 0: torch's default, two on this machine). On a two-core
machine shared with other jobs, two threads made batched generation several times slower and erratic in our trials.

    python benchmarks/build_cache.py                                 # 256 queries, 5 rounds, hidden 256 x 4 layers
    python benchmarks/build_cache.py --rounds 5 --sequential-queries 32
    python benchmarks/build_cache.py --hidden-size 128 --layers 2   # smaller model: Python overhead dominates
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time

import numpy as np
import torch
from harness import announce_delia, conversation, quiet, rotated, write_jsonl

from delia.build_cache import build_cache
from delia.generation import transformers_backend
from delia.generation.prompts import PromptRenderer, build_conversation
from delia.tiny import TRAINING_TEXT, build_tiny_tokenizer, save_tiny_model

MIN_LENGTH = 24  # the template's 16 tokens, the query's index and a few words


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--queries", type=int, default=256, help="queries answered by the batched configurations")
    parser.add_argument("--sequential-queries", type=int, default=64, help="subset answered one at a time")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="min_new_tokens = max_new_tokens")
    parser.add_argument("--rounds", type=int, default=5, help="rounds (each runs every configuration once)")
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--median-length", type=int, default=40, help="median prompt length in tokens")
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the prompt lengths")
    parser.add_argument("--max-length", type=int, default=448, help="longest prompt (the tiny model has 512 positions)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default; see the docstring)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    assert 0 < args.sequential_queries <= args.queries, "--sequential-queries must be between 1 and --queries"
    assert args.max_length + args.new_tokens <= 512, "prompt + reply must fit the tiny model's 512 positions"
    assert args.rounds >= 1
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Prompts of skewed length


class Prompts:
    """The queries, in file order (long and short mixed), their prompt lengths, and the sequential subset."""

    def __init__(self, args: argparse.Namespace):
        self.tokenizer = build_tiny_tokenizer("llama2")
        self.renderer = PromptRenderer(self.tokenizer)
        self.words = TRAINING_TEXT.split()
        self.template_length = self.prompt_length("x") - 1  # the chat template's own tokens around the query
        rng = np.random.default_rng(args.seed)
        targets = np.exp(rng.normal(np.log(args.median_length), args.sigma, args.queries))
        targets = np.clip(np.round(targets), MIN_LENGTH, args.max_length).astype(int)
        self.queries = [self.make_query(index, int(target), rng) for index, target in enumerate(targets)]
        rng.shuffle(self.queries)  # file order: long and short mixed
        self.lengths = [self.prompt_length(query) for query in self.queries]
        assert len(set(self.queries)) == len(self.queries)
        # the sequential subset: every k-th query by prompt length, so it has the full set's length distribution
        self.by_length = sorted(range(args.queries), key=lambda index: self.lengths[index])
        step = args.queries / args.sequential_queries
        self.subset = sorted(self.by_length[int(i * step + step / 2)] for i in range(args.sequential_queries))

    def prompt_length(self, query: str) -> int:
        """Tokens of the rendered prompt, as TransformersBackend.prepare counts them."""
        prompt = self.renderer.render(build_conversation(query, None, "plain", None))
        return len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])

    def make_query(self, index: int, target: int, rng: np.random.Generator) -> str:
        """Query `index`: random words from the tokenizer's text, cut so the rendered prompt has about `target` tokens."""
        words = " ".join(rng.choice(self.words, size=target))  # at least one token per word: more than enough
        ids = self.tokenizer(f"{index}: {words}", add_special_tokens=False)["input_ids"]
        return self.tokenizer.decode(ids[: target - self.template_length]).strip()

    def padding(self, order: list[int], batch_size: int, new_tokens: int) -> tuple[float, float]:
        """Share of the prompt slots (prefill) and of the key/value slots read while decoding that are padding."""
        prompt_real = prompt_slots = kv_real = kv_slots = 0
        for start in range(0, len(order), batch_size):
            batch = [self.lengths[index] for index in order[start : start + batch_size]]
            width = max(batch)
            prompt_real += sum(batch)
            prompt_slots += width * len(batch)
            for t in range(new_tokens):
                kv_real += sum(batch) + t * len(batch)
                kv_slots += (width + t) * len(batch)
        return 1 - prompt_real / prompt_slots, 1 - kv_real / kv_slots

    def write(self, path: str, indices: list[int]) -> tuple[str, int]:
        """The queries at `indices` as a JSONL file of conversations; (path, number of queries)."""
        write_jsonl(path, (conversation(self.queries[index], "ok") for index in indices))
        return path, len(indices)


def percentiles(values: list[int]) -> str:
    """Mean, median, p90, p99 and max, on one line."""
    p = np.percentile(values, [50, 90, 99])
    return f"mean {np.mean(values):.0f}, median {p[0]:.0f}, p90 {p[1]:.0f}, p99 {p[2]:.0f}, max {max(values)}"


def describe(args: argparse.Namespace, prompts: Prompts) -> None:
    """Print the prompt lengths, the padding each batching leaves, and the model."""
    sorted_order = sorted(range(args.queries), key=lambda index: -prompts.lengths[index])  # as build_cache sorts
    pad_unsorted = prompts.padding(list(range(args.queries)), args.batch_size, args.new_tokens)
    pad_sorted = prompts.padding(sorted_order, args.batch_size, args.new_tokens)
    print(f"prompt lengths in tokens, all {args.queries} queries: {percentiles(prompts.lengths)}")
    subset_lengths = [prompts.lengths[index] for index in prompts.subset]
    print(f"  the {len(prompts.subset)} answered one at a time: {percentiles(subset_lengths)}")
    print(
        f"padding at batch {args.batch_size}: unsorted {100 * pad_unsorted[0]:.0f}% of prompt slots, "
        f"{100 * pad_unsorted[1]:.0f}% of decode key/value slots; sorted {100 * pad_sorted[0]:.0f}% and "
        f"{100 * pad_sorted[1]:.0f}%"
    )
    print(
        f"model: tiny Llama hidden {args.hidden_size} x {args.layers} layers, float32; {args.new_tokens} new tokens "
        f"per query, greedy; torch threads {torch.get_num_threads()}"
    )


# ----------------------------------------------------------------------------------------------------------------------
# Timing

generate_seconds = [0.0]
_stream = transformers_backend.TransformersBackend.stream


def timed_stream(self, prompts, sampling):
    """TransformersBackend.stream, adding the time spent producing each reply to generate_seconds."""
    replies = _stream(self, prompts, sampling)
    while True:
        start = time.perf_counter()
        try:
            reply = next(replies)
        except StopIteration:
            return
        finally:
            generate_seconds[0] += time.perf_counter() - start
        yield reply


def configs(args: argparse.Namespace) -> dict[str, tuple[str, int, bool]]:
    """name: (query file, batch_size, sort_by_length)."""
    return {
        "sequential": ("subset", 1, False),
        "unsorted": ("all", args.batch_size, False),
        "sorted": ("all", args.batch_size, True),
    }


def run(args: argparse.Namespace, model_dir: str, name: str, files: dict[str, tuple[str, int]], output: str) -> dict:
    """One whole build_cache call of configuration `name`; checks the token counts; returns its figures and replies."""
    which, batch_size, sort = configs(args)[name]
    path, count = files[which]
    generate_seconds[0] = 0.0
    gc.collect()
    start = time.perf_counter()
    result = build_cache(
        model_dir,
        path,
        output,
        template="plain",
        system_prompt=None,
        backend="transformers",
        batch_size=batch_size,
        sort_by_length=sort,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        temperature=0.0,
        seed=args.seed,
        progress=False,
    )
    wall = time.perf_counter() - start
    if result.tokens != count * args.new_tokens or result.hit_max_new_tokens != count:
        raise SystemExit(f"FAIL: {name}: expected {count} x {args.new_tokens} tokens, got counts {result.counts()}")
    with open(output, encoding="utf-8") as handle:
        replies = {row["id"]: row["messages"][1]["content"] for row in map(json.loads, handle)}
    return {
        "tokens": result.tokens,
        "seconds": result.seconds,
        "wall": wall,
        "generate": generate_seconds[0],
        "replies": replies,
    }


def measure(args: argparse.Namespace, prompts: Prompts, started: float) -> dict[str, list[dict]]:
    """Warm-up, then --rounds rounds of every configuration, the order rotating; each configuration's results."""
    names = list(configs(args))
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="delia-build-cache-") as workdir:
        model_dir = os.path.join(workdir, "model")
        save_tiny_model(
            model_dir,
            tokenizer=prompts.tokenizer,
            hidden_size=args.hidden_size,
            num_hidden_layers=args.layers,
            seed=args.seed,
        )
        by_length = prompts.by_length
        files = {
            "all": prompts.write(os.path.join(workdir, "all.jsonl"), list(range(args.queries))),
            "subset": prompts.write(os.path.join(workdir, "subset.jsonl"), prompts.subset),
            "warmup": prompts.write(
                os.path.join(workdir, "warmup.jsonl"),
                [by_length[0], by_length[args.queries // 2], by_length[-2], by_length[-1]],
            ),
        }
        warmup_files = {"all": files["warmup"], "subset": files["warmup"]}
        for name in names:  # untimed warm-up
            run(args, model_dir, name, warmup_files, os.path.join(workdir, f"warmup-{name}.jsonl"))
        print(f"set-up and warm-up: {time.perf_counter() - started:.1f} s")

        for round_index in range(args.rounds):
            line = []
            for name in rotated(names, round_index):
                result = run(args, model_dir, name, files, os.path.join(workdir, f"{name}-{round_index}.jsonl"))
                results[name].append(result)
                line.append(f"{name} {result['tokens'] / result['seconds']:.0f} tok/s ({result['seconds']:.1f} s)")
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(line), flush=True)
    return results


def report(args: argparse.Namespace, results: dict[str, list[dict]], started: float) -> None:
    """The table of medians, the replies' agreement, per-round ratios, and the two ratio lines last."""
    names = list(results)
    rate = {name: statistics.median(r["tokens"] / r["seconds"] for r in results[name]) for name in names}
    print()
    print(f"{'configuration':<13} {'queries':>7} {'tok/s':>7} {'range':>13} {'seconds':>8} {'generating':>14}")
    for name in names:
        rates = [r["tokens"] / r["seconds"] for r in results[name]]
        seconds = statistics.median(r["seconds"] for r in results[name])
        in_generate = statistics.median(r["tokens"] / r["generate"] for r in results[name])
        queries_done = results[name][0]["tokens"] // args.new_tokens
        print(
            f"{name:<13} {queries_done:>7} {rate[name]:>7.0f} {min(rates):>6.0f}-{max(rates):<6.0f} {seconds:>8.2f} "
            f"{in_generate:>8.0f} tok/s"
        )
    print("tok/s: generated tokens / CacheResult seconds (whole call), median over rounds; range: min-max over rounds")

    # same greedy replies whatever the batching? (float32; left padding changes the arithmetic a little, and a random
    # model's near-flat logits can flip an argmax, so a few differences are expected)
    first = {name: results[name][0]["replies"] for name in names}
    same_sorted = sum(first["unsorted"][key] == reply for key, reply in first["sorted"].items())
    same_sequential = sum(first["sorted"].get(key) == reply for key, reply in first["sequential"].items())
    print(
        f"identical replies: sorted vs unsorted {same_sorted}/{len(first['sorted'])}, "
        f"sequential vs sorted {same_sequential}/{len(first['sequential'])} (rows kept; empty replies are dropped)"
    )
    for round_index in range(args.rounds):
        per_round = {
            name: results[name][round_index]["tokens"] / results[name][round_index]["seconds"] for name in names
        }
        print(
            f"round {round_index + 1}: sorted/sequential {per_round['sorted'] / per_round['sequential']:.2f}, "
            f"sorted/unsorted {per_round['sorted'] / per_round['unsorted']:.2f}"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    print(f"speedup_vs_sequential={rate['sorted'] / rate['sequential']:.2f}")
    print(f"sorted_vs_unsorted={rate['sorted'] / rate['unsorted']:.2f}")


def main(argv: list[str] | None = None) -> None:
    """Sequential, unsorted and sorted build_cache calls in turn; prints the table and the two ratios last."""
    args = parse_arguments(argv)
    quiet(args.threads)
    announce_delia()
    prompts = Prompts(args)
    describe(args, prompts)
    transformers_backend.TransformersBackend.stream = timed_stream
    started = time.perf_counter()
    report(args, measure(args, prompts, started), started)


if __name__ == "__main__":
    main()
