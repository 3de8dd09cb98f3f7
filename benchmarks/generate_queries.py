"""
Queries a model writes itself (Magpie, `build_cache(..., generate_queries=N)`): how many are distinct, how long, what
they look like, and how fast they come, on SmolLM2-135M-Instruct on the CPU by default.

What is measured: one `delia.generation.magpie.generate_queries` call, the same code `build_cache` runs before it
answers the queries (transformers backend, the model loaded once by `make_backend`, bf16 by default), asked for
--count queries with the default filters and at most 4 candidates per query. Printed:
  - candidates tried and kept; the distinct rate, two ways: kept / tried (usable and new), and kept / (kept +
    duplicates + near duplicates), the share of the usable candidates that were new
  - the candidates dropped, by reason
  - the length of the kept queries, in words and in tokens (min, 10th, 25th, 50th, 75th, 90th percentile, max) and
    a histogram by words
  - --samples kept queries, picked with a seeded random generator
  - generated tokens per second: every candidate's tokens (kept or not) over the seconds of the call (which include
    the filtering and the durable writes, a small share)
The queries file is written to a temporary folder (or --output) and left there with --output.

    python benchmarks/generate_queries.py                          # 250 queries from SmolLM2-135M-Instruct, bf16
    python benchmarks/generate_queries.py --count 100 --dtype float32 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

from harness import announce_delia, quiet

from delia.data.query_filter import DUPLICATE, NEAR_DUPLICATE, describe_dropped
from delia.generation.factory import BackendOptions, make_backend
from delia.generation.magpie import generate_queries, user_turn_of
from delia.io import iter_jsonl
from delia.models import resolve_model


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="short name, folder or hub name")
    parser.add_argument("--count", type=int, default=250, help="queries asked for")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="tokens per query at most")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--samples", type=int, default=20, help="kept queries to print")
    parser.add_argument("--output", default=None, help="the queries file to write (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: delia's free-core policy)")
    return parser.parse_args(argv)


def percentiles(values: list[int]) -> str:
    """min / p10 / p25 / median / p75 / p90 / max of `values`."""
    ordered = sorted(values)
    at = lambda share: ordered[min(len(ordered) - 1, int(share * len(ordered)))]  # noqa: E731
    return (
        f"min {ordered[0]}, p10 {at(0.1)}, p25 {at(0.25)}, median {statistics.median(ordered):g}, p75 {at(0.75)}, "
        f"p90 {at(0.9)}, max {ordered[-1]}, mean {statistics.fmean(ordered):.1f}"
    )


def histogram(words: list[int]) -> str:
    """Kept queries by length in words."""
    buckets = [(3, 5), (6, 10), (11, 20), (21, 40), (41, 80), (81, 10**9)]
    parts = []
    for low, high in buckets:
        count = sum(low <= value <= high for value in words)
        label = f"{low}-{high}" if high < 10**9 else f"{low}+"
        parts.append(f"{label}: {count} ({100 * count / len(words):.0f}%)")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    args = parse_arguments(argv)
    quiet(args.threads)
    announce_delia()
    model = resolve_model(args.model)
    with tempfile.TemporaryDirectory() as workdir:
        path = args.output or os.path.join(workdir, "cache.jsonl.queries.jsonl")
        started = time.perf_counter()
        options = BackendOptions(name="transformers", batch_size=args.batch_size, dtype=args.dtype)
        engine = make_backend(options, model, seed=args.seed)
        print(f"model: {args.model} ({model}), {args.dtype}, loaded in {time.perf_counter() - started:.1f} s")
        turn = user_turn_of(engine, model)
        print(f"prefix: {turn.prefix!r}; end of turn: {turn.end!r}")
        result = generate_queries(
            engine, turn, args.count, path, max_new_tokens=args.max_new_tokens, seed=args.seed,
            batch_size=args.batch_size, model=args.model,
        )  # fmt: skip
        queries = [row["query"] for _, row in iter_jsonl(path)]
        tokenizer = engine.tokenizer
        engine.close()
    tokens = [len(tokenizer(query, add_special_tokens=False)["input_ids"]) for query in queries]
    words = [len(query.split()) for query in queries]
    usable = result.kept + result.dropped.get(DUPLICATE, 0) + result.dropped.get(NEAR_DUPLICATE, 0)
    print()
    print(f"asked {result.asked}, kept {result.kept}, tried {result.attempts} candidates")
    print(f"distinct rate (kept / tried): {result.kept / result.attempts:.3f}")
    new_share = result.kept / usable
    print(f"distinct rate among usable candidates (kept / (kept + duplicates + near duplicates)): {new_share:.3f}")
    print(f"dropped: {describe_dropped(result.dropped)}")
    print(f"length in words: {percentiles(words)}")
    print(f"length in tokens: {percentiles(tokens)}")
    print(f"by words: {histogram(words)}")
    print(f"\n{args.samples} kept queries (seeded pick):")
    for number, query in enumerate(random.Random(args.seed).sample(queries, min(args.samples, len(queries))), 1):
        print(f"{number:2d}. {query!r}")
    print()
    print(
        f"generated tokens: {result.tokens} in {result.seconds:.1f} s = {result.tokens / result.seconds:.1f} tokens/s"
    )
    print(f"kept queries per second: {result.kept / result.seconds:.2f}")


if __name__ == "__main__":
    main()
