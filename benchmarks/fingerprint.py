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
import os
import shutil
import statistics
import tempfile

import numpy as np
from harness import announce_delia, timed, write_synthetic_rows


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the synthetic diverse cache")
    parser.add_argument("--downstream-rows", type=int, default=100)
    parser.add_argument("--ratio", type=float, default=10_000.0, help="diverse rows per downstream row")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace, workdir: str) -> tuple[dict[str, list[float]], float, float, int]:
    """Prepare and fingerprint, alternating; (seconds of each part per repeat, cache MiB, mixture MiB, mixture rows)."""
    from delia.data import prepare_datasets
    from delia.data.fingerprint import file_identity, hash_rows, mixture_fingerprint

    rng = np.random.default_rng(args.seed)
    cache, downstream = os.path.join(workdir, "cache.jsonl"), os.path.join(workdir, "downstream.jsonl")
    write_synthetic_rows(cache, args.rows, rng, system_share=0.0)
    write_synthetic_rows(downstream, args.downstream_rows, rng, system_share=0.0)
    cache_mb = os.path.getsize(cache) / 2**20
    print(f"cache: {args.rows:,} rows, {cache_mb:.0f} MiB JSONL; downstream: {args.downstream_rows} rows")

    def prepare():
        return prepare_datasets(downstream, cache, ratio=args.ratio, seed=args.seed)

    prepared, seconds = timed(prepare)
    print(f"first prepare (JSON -> Arrow conversion, not counted): {seconds:.1f} s")
    mixture_mb = prepared.unshuffled.data.nbytes / 2**20
    print(f"mixture: {len(prepared.train_dataset):,} rows, {mixture_mb:.0f} MiB of Arrow data")

    times: dict[str, list[float]] = {"prepare": [], "fingerprint": [], "rows": [], "files": []}
    fingerprints = set()
    for repeat in range(args.repeats):
        del prepared
        prepared, seconds = timed(prepare)
        times["prepare"].append(seconds)
        fingerprint, seconds = timed(mixture_fingerprint, prepared, downstream, cache)
        fingerprints.add(fingerprint["combined"])
        times["fingerprint"].append(seconds)
        times["rows"].append(timed(hash_rows, prepared.unshuffled, prepared.order)[1])
        times["files"].append(timed(lambda: (file_identity(cache), file_identity(downstream)))[1])
        print(
            f"repeat {repeat + 1}: prepare {times['prepare'][-1]:.2f} s, fingerprint {times['fingerprint'][-1]:.2f} s "
            f"(rows' hash {times['rows'][-1]:.2f} s, files' sha256 {times['files'][-1]:.2f} s)"
        )
    assert len(fingerprints) == 1, "the same mixture gave different fingerprints"
    return times, cache_mb, mixture_mb, len(prepared.train_dataset)


def main(argv: list[str] | None = None) -> None:
    """Prepare and fingerprint in a fresh datasets cache; the medians, and `ratio=` last."""
    args = parse_arguments(argv)
    workdir = tempfile.mkdtemp(prefix="delia-fingerprint-")
    os.environ["HF_DATASETS_CACHE"] = os.path.join(workdir, "hf")  # before datasets is imported: a cold cache
    try:
        announce_delia()
        times, cache_mb, mixture_mb, rows = measure(args, workdir)
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
        f"prepare_s={median['prepare']:.2f} rows={rows} cache_mb={cache_mb:.0f}"
    )


if __name__ == "__main__":
    main()
