"""
Cost of the mixture fingerprint `DSFTTrainer` computes at init, next to the mixing it follows.

On a synthetic JSONL cache of --rows conversational rows and a --downstream-rows downstream file, mixed at --ratio
(by default 100 x 10,000 = a 1,000,100-row mixture drawn from a 1,000,000-row cache):

    prepare      delia.prepare_datasets(downstream, cache, ratio)   read both files (Arrow already converted: warm),
                                                                      validate, draw, split, align, interleave
    fingerprint  mixture_fingerprint(prepared, downstream, cache)   the rows' hash (Arrow IPC of the mixed rows,
                                                                      then the interleave order) + sha256 of both
                                                                      files; printed split into its two parts

Both run in this one process, alternating, --repeats times; the first prepare (the JSON -> Arrow conversion) is not
counted. The last line is the median fingerprint time over the median prepare time.

    python benchmarks/fingerprint.py                       # 1,000,000-row cache, 1,000,100-row mixture
    python benchmarks/fingerprint.py --rows 200000 --ratio 2000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np

parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the synthetic diverse cache")
parser.add_argument("--downstream-rows", type=int, default=100)
parser.add_argument("--ratio", type=float, default=10_000.0, help="diverse rows per downstream row")
parser.add_argument("--repeats", type=int, default=3)
parser.add_argument("--seed", type=int, default=0)
args = parser.parse_args()

WORDS = "the a of to and in is that for it as with on was by sea river light answer question data model 東京 über"


def write_rows(path: str, rows: int, rng: np.random.Generator) -> None:
    """Conversational rows with log-uniform lengths: user 10-500 characters, assistant 20-2000."""
    pool = " ".join(rng.choice(np.array(WORDS.split(), dtype=object), size=1_000_000))
    user_len = np.exp(rng.uniform(np.log(10), np.log(500), rows)).astype(int)
    reply_len = np.exp(rng.uniform(np.log(20), np.log(2000), rows)).astype(int)
    user_at, reply_at = rng.integers(0, len(pool) - 500, rows), rng.integers(0, len(pool) - 2000, rows)
    with open(path, "w", encoding="utf-8") as out:
        for i in range(rows):
            user = pool[user_at[i] : user_at[i] + user_len[i]].strip() or "x"
            reply = pool[reply_at[i] : reply_at[i] + reply_len[i]].strip() or "x"
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


workdir = tempfile.mkdtemp(prefix="delia-fingerprint-")
os.environ["HF_DATASETS_CACHE"] = os.path.join(workdir, "hf")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
try:
    from delia.data import prepare_datasets
    from delia.data.fingerprint import file_identity, hash_rows, mixture_fingerprint

    rng = np.random.default_rng(args.seed)
    cache, downstream = os.path.join(workdir, "cache.jsonl"), os.path.join(workdir, "downstream.jsonl")
    write_rows(cache, args.rows, rng)
    write_rows(downstream, args.downstream_rows, rng)
    cache_mb = os.path.getsize(cache) / 2**20
    print(f"cache: {args.rows:,} rows, {cache_mb:.0f} MiB JSONL; downstream: {args.downstream_rows} rows")

    def prepare():
        return prepare_datasets(downstream, cache, ratio=args.ratio, seed=args.seed)

    start = time.perf_counter()
    prepared = prepare()
    print(f"first prepare (JSON -> Arrow conversion, not counted): {time.perf_counter() - start:.1f} s")
    mixture_mb = prepared.unshuffled.data.nbytes / 2**20
    print(f"mixture: {len(prepared.train_dataset):,} rows, {mixture_mb:.0f} MiB of Arrow data")

    times: dict[str, list[float]] = {"prepare": [], "fingerprint": [], "rows": [], "files": []}
    fingerprints = set()
    for repeat in range(args.repeats):
        del prepared
        start = time.perf_counter()
        prepared = prepare()
        times["prepare"].append(time.perf_counter() - start)
        start = time.perf_counter()
        fingerprints.add(mixture_fingerprint(prepared, downstream, cache)["combined"])
        times["fingerprint"].append(time.perf_counter() - start)
        start = time.perf_counter()
        hash_rows(prepared.unshuffled, prepared.order)
        times["rows"].append(time.perf_counter() - start)
        start = time.perf_counter()
        file_identity(cache), file_identity(downstream)
        times["files"].append(time.perf_counter() - start)
        print(
            f"repeat {repeat + 1}: prepare {times['prepare'][-1]:.2f} s, fingerprint {times['fingerprint'][-1]:.2f} s "
            f"(rows' hash {times['rows'][-1]:.2f} s, files' sha256 {times['files'][-1]:.2f} s)"
        )
    assert len(fingerprints) == 1, "the same mixture gave different fingerprints"
finally:
    shutil.rmtree(workdir, ignore_errors=True)

median = {name: statistics.median(values) for name, values in times.items()}
print(
    f"median: prepare {median['prepare']:.2f} s; fingerprint {median['fingerprint']:.2f} s = rows' hash "
    f"{median['rows']:.2f} s ({mixture_mb / median['rows']:.0f} MiB/s) + files' sha256 {median['files']:.2f} s "
    f"({cache_mb / median['files']:.0f} MiB/s)"
)
print(
    f"ratio={median['fingerprint'] / median['prepare']:.3f} fingerprint_s={median['fingerprint']:.2f} "
    f"prepare_s={median['prepare']:.2f} rows={len(prepared.train_dataset)} cache_mb={cache_mb:.0f}"
)
