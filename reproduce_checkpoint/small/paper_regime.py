"""The paper's regime at small scale, in one command: one epoch over a large self-generated mixture against plain SFT.

    python reproduce_checkpoint/small/paper_regime.py                 # into runs/paper-regime, 100 min on 2 cores
    python reproduce_checkpoint/small/paper_regime.py --downstream_rows 16 --ratios 30 60   # smaller and faster

1. The model by short name (`delia fetch-model smollm2-135m-instruct`).
2. Queries with no query file: the model writes `max(ratios) x downstream_rows + held_out` queries itself (Magpie,
   `build_cache(generate_queries=N)`) and answers each once (bf16 where the CPU computes it natively).
3. `held_out` of those rows, drawn with `--seed`, become the general set (the general NLL of the base model's own
   replies to queries no run trains on); the rest is the diverse cache.
4. The downstream rows: `downstream_rows` of the bundled `<sep>` training rows, half 'yes' and half 'no', drawn with
   `--seed`.
5. `delia sweep --config paper_regime.yaml --arms 0:1 0:3 0:10 30:1 100:1`: plain SFT for 1, 3 and 10 epochs and
   DELIA for ONE epoch over each mixture (each downstream row seen once), the same learning rate for every arm, each
   run evaluated and probed; the frontier figure (format rate against the change in general NLL).
6. `results.md` in the output folder: the query-generation figures, the sweep table, the hardware, the wall times.

Options after `--` go to `delia sweep` unchanged. The cache and every finished run are reused by a second call with
the same settings, so a killed run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from reproduce import describe_cache, finished_runs, hardware

HERE = Path(__file__).resolve().parent
TRAIN_ROWS = HERE.parent / "train_dataset.jsonl"
RECIPE = HERE / "paper_regime.yaml"
LABELS = ("yes", "no")


def read_rows(path: Path) -> list[dict]:
    """The JSON rows of a JSONL file (blank lines skipped; a bad line is an error naming the file and line)."""
    from delia.io import iter_jsonl

    return [row for _, row in iter_jsonl(path)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` as JSONL at `path`, atomically (a rerun rewrites the same rows)."""
    from delia.io import replace_atomically

    replace_atomically(
        str(path), lambda out: out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    )
    return path


def downstream_subset(count: int, seed: int, output_dir: Path) -> Path:
    """`count` bundled training rows, half answering 'yes' and half 'no', drawn and shuffled with `seed`."""
    from delia.evaluation.metrics import reference_label

    by_label: dict[str | None, list[dict]] = {label: [] for label in LABELS}
    for row in read_rows(TRAIN_ROWS):
        by_label.setdefault(reference_label(row["messages"][-1]["content"]), []).append(row)
    rng = random.Random(seed)
    wanted = {"yes": count // 2, "no": count - count // 2}
    for label, number in wanted.items():
        if number > len(by_label[label]):
            raise SystemExit(
                f"paper_regime.py: error: --downstream_rows {count} asks for {number} '{label}' rows; "
                f"{TRAIN_ROWS} has {len(by_label[label])}"
            )
    rows = [row for label in LABELS for row in rng.sample(by_label[label], wanted[label])]
    rng.shuffle(rows)
    return write_rows(output_dir / "downstream_subset.jsonl", rows)


def split_cache(cache: Path, held_out: int, seed: int, output_dir: Path) -> tuple[Path, Path]:
    """The self-sampled rows split in two with `seed`: `held_out` rows for the general NLL, the rest the diverse cache.
    Rows are taken in the order of their ids, so the split does not depend on the order a resumed run wrote them in."""
    rows = sorted(read_rows(cache), key=lambda row: str(row["id"]))
    if held_out >= len(rows):
        raise SystemExit(f"paper_regime.py: error: --held_out {held_out} leaves nothing of the {len(rows)} cache rows")
    chosen = set(random.Random(seed).sample(range(len(rows)), held_out))
    general = write_rows(output_dir / "general_held_out.jsonl", [row for i, row in enumerate(rows) if i in chosen])
    diverse = write_rows(output_dir / "diverse_cache.jsonl", [row for i, row in enumerate(rows) if i not in chosen])
    return diverse, general


def query_figures(cache: Path) -> list[str]:
    """What query generation made, from its meta and queries files: tried, kept, dropped and why, lengths."""
    from delia.generation.magpie import meta_path, queries_path
    from delia.io import read_json

    meta = read_json(meta_path(queries_path(str(cache))), "the meta file of the generated queries")
    words = sorted(len(row["query"].split()) for row in read_rows(Path(queries_path(str(cache)))))
    dropped = ", ".join(f"{reason} {count}" for reason, count in sorted(meta.get("dropped", {}).items())) or "none"
    deciles = statistics.quantiles(words, n=10)
    return [
        f"Queries: {meta['kept']} kept of {meta['attempts']} candidates drawn (kept / tried "
        f"{meta['kept'] / meta['attempts']:.3f}); dropped: {dropped}",
        f"Query length in words: median {statistics.median(words):g}, 10th-90th percentile "
        f"{deciles[0]:g}-{deciles[-1]:g}, longest {words[-1]}",
    ]


def arms(ratios: list[float], sft_epochs: list[float]) -> list[str]:
    """The sweep's arms: plain SFT (ratio 0) for each of `sft_epochs`, then DELIA for one epoch at each ratio."""
    return [f"0:{epochs:g}" for epochs in sft_epochs] + [f"{ratio:g}:1" for ratio in ratios]


def frontier_lines(rows: list[dict]) -> list[str]:
    """The frontier as a small table: each arm's format rate and change in general NLL from the base model."""
    from delia.evaluation.sweep_table import frontier_points

    lines = ["| arm | dict rate, follow | change in general NLL/token |", "| --- | --- | --- |"]
    lines += [f"| {name} | {rate:.1%} | {change:+.4f} |" for name, change, rate in frontier_points(rows)]
    return lines


def parse_options(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """This script's options, and the rest (for `delia sweep`)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/paper-regime")
    parser.add_argument("--downstream_rows", type=int, default=24, help="bundled <sep> rows trained on (half 'yes')")
    parser.add_argument("--ratios", type=float, nargs="+", default=[30, 100], help="DELIA's ratios, one epoch each")
    parser.add_argument("--sft_epochs", type=float, nargs="+", default=[1, 3, 10], help="plain SFT's epochs")
    parser.add_argument("--held_out", type=int, default=128, help="generated queries kept for the general NLL")
    parser.add_argument("--cache_max_new_tokens", type=int, default=96, help="tokens per self-sampled reply at most")
    parser.add_argument("--seed", type=int, default=0, help="seed of the queries, replies, held-out set and subset")
    options, rest = parser.parse_known_args(argv)
    for name in ("downstream_rows", "held_out", "cache_max_new_tokens"):
        if getattr(options, name) <= 0:
            parser.error(f"--{name} must be a positive integer, got {getattr(options, name)}")
    if min(options.ratios) <= 0:  # ratio 0 is plain SFT, which --sft_epochs gives
        parser.error(f"--ratios must be above 0 (plain SFT's arms come from --sft_epochs), got {min(options.ratios):g}")
    return options, [arg for arg in rest if arg != "--"]


def main(argv: list[str] | None = None) -> int:
    options, sweep_argv = parse_options(argv)
    from delia.experiment import Experiment
    from delia.io import write_text_atomically
    from delia.run_files import SWEEP_TABLE_FILE
    from delia.sweep import SweepInputError, parse_arguments

    output_dir = Path(options.output_dir)
    diverse, general = output_dir / "diverse_cache.jsonl", output_dir / "general_held_out.jsonl"
    subset = output_dir / "downstream_subset.jsonl"
    paths = ["--train_dataset", subset, "--diverse_dataset", diverse, "--general_queries", general]
    recipe = ["--config", RECIPE, "--arms", *arms(options.ratios, options.sft_epochs), *paths]
    try:  # the recipe and the options first: a bad one is one line, before the model is fetched
        sweep_options = parse_arguments([str(arg) for arg in [*recipe, "--output_dir", output_dir, *sweep_argv]])
    except (ValueError, OSError) as error:
        print(f"paper_regime.py: error: {error}", file=sys.stderr)
        return 2
    experiment = Experiment.start("smollm2-135m-instruct", output_dir)
    queries = int(max(options.ratios) * options.downstream_rows + 0.5) + options.held_out
    cache = experiment.self_sample(
        None,
        output_dir / "self_sample_generated.jsonl",
        generate_queries=queries,
        max_new_tokens=options.cache_max_new_tokens,
        seed=options.seed,
    )
    counts = cache.counts()
    split_cache(Path(cache.path), options.held_out, options.seed, output_dir)
    downstream_subset(options.downstream_rows, options.seed, output_dir)
    reused = finished_runs(output_dir)
    try:
        rows = experiment.sweep(*sweep_options)
    except SweepInputError as error:
        print(f"paper_regime.py: error: {error}", file=sys.stderr)
        return 2

    lines = [
        "# Small-scale <sep> reproduction, the paper's regime: measured",
        "",
        f"Command: `python reproduce_checkpoint/small/paper_regime.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        f"Hardware: {hardware()}",
        *query_figures(Path(cache.path)),
        f"Self-sampled: {describe_cache(Path(cache.path))}; {options.held_out} held out for the general NLL, the rest "
        f"the diverse cache; {options.downstream_rows} downstream rows",
        f"Wall time: {experiment.wall_seconds() / 60:.1f} min ("
        + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in experiment.timings.items())
        + ")",
    ]
    if counts["skipped_already_done"] or reused:
        lines.append(
            f"Resumed: {counts['skipped_already_done']} cache rows and {reused} evaluated runs came from an earlier "
            "call; the wall time above covers this call only."
        )
    table = (output_dir / SWEEP_TABLE_FILE).read_text(encoding="utf-8").rstrip()
    lines += ["", table, "", "The frontier (`sweep_frontier.svg`):", "", *frontier_lines(rows), ""]
    write_text_atomically(output_dir / "results.md", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
