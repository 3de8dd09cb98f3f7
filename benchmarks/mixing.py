"""
Cost of mixing a large diverse cache: `delia.mix_datasets` against loading the cache alone, in time and peak memory.

What is measured, on a synthetic JSONL cache of --rows conversational rows (varied lengths, a few with a system
message, some non-ASCII text) and a small downstream JSONL:

    load      delia.load_conversations(cache)                                  read + validate every row
    load+mix  delia.mix_datasets(downstream, cache, ratio=--ratio, seed=0)     the same, plus the downstream rows,
                                                                               the draw, the prompt/completion
                                                                               split of the drawn rows, the interleave

Each measurement runs in a fresh Python process (so peak RSS is that call's own, and no state carries over), timing
only the call: after the imports, and after loading a separate 4-row JSONL. The first JSON load of a process ran a
few tenths of a second slower than later ones (one-time set-up inside `datasets`); without that warm-up, mix_datasets
would pay it on its small downstream file and load_conversations on the cache itself, which skews the comparison.
The two kinds alternate, --repeats times each; the last line is the median load+mix time over the median load time,
the largest peak RSS of the load+mix runs, the most the process's own memory (RssAnon) grew during one load+mix call,
and the cache size; the ratio of the other state is printed just before it.

Cold or warm: `datasets` converts a JSON file to Arrow once and keeps the result in HF_DATASETS_CACHE; later loads
memory-map it. Both states matter (a first run, and every run after it), and they must be the same for both kinds:
    cold  every measurement gets a fresh, empty HF_DATASETS_CACHE, so each pays the JSON -> Arrow conversion
    warm  both files are converted once beforehand; every measurement memory-maps them. Any Arrow files that
          mix_datasets leaves next to them are deleted after each measurement (it keeps its outputs in memory, so
          normally there are none): a second run must not reuse them and skip the mixing work
--state picks one or both (the default); the last line reports the first state in --state order (cold by default).
The JSONL file itself sits in the OS page cache in both (it was just written, and fits in RAM), so neither
kind pays for disk reads of the JSON.

Peak RSS is `ru_maxrss` of the child. It counts the memory-mapped Arrow pages the call touched (file-backed, given
back by the OS under pressure) as well as the process's own memory, so the child also samples RssAnon (its own
memory only) every 10 ms and reports its peak, with the RSS right after the imports for reference.

After the measurements of each state, one more child times the steps inside mix_datasets one by one (the same calls
in the same order, from delia.data), to show where the time goes; --no-breakdown skips it.

--large is the scale check (not the default run): a 10,000,000-row cache (about 6 GiB of JSONL, and as much again
once datasets converts it to Arrow; the free disk is checked first) mixed at ratio 100 into 1,000 downstream rows,
warm state, three measurements of each kind. Its conversion run is a cold load+mix and is printed in full. The
figure to watch is the process's own memory growth (RssAnon), which must stay far below the cache's size: nothing
on delia's path may hold the rows in Python memory. The files are written under a temporary folder and deleted
afterwards (a --workdir is kept). Any option given with --large wins over the preset.

Every child imports the delia of this checkout (benchmarks/harness.py puts the repository root first on its sys.path),
not an installed one; the first result prints which.

    python benchmarks/mixing.py                     # 1,000,000 rows, both states, 5 repeats each
    python benchmarks/mixing.py --rows 200000 --state warm --repeats 5
    python benchmarks/mixing.py --large             # 10,000,000 rows (several GB on disk, several minutes)
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from harness import MEAN_ROW_BYTES, write_synthetic_rows


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's settings (and the hidden --child options a measurement process gets)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the synthetic diverse cache")
    parser.add_argument("--downstream-rows", type=int, default=100)
    parser.add_argument("--ratio", type=float, default=100.0, help="diverse rows per downstream row")
    parser.add_argument("--repeats", type=int, default=5, help="measurements of each kind, per state")
    parser.add_argument("--state", default="cold,warm", help="comma-separated: cold, warm (see the docstring)")
    parser.add_argument("--no-breakdown", dest="breakdown", action="store_false", help="skip the step-by-step timing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to write the files (default: a temporary folder)")
    parser.add_argument("--large", action="store_true", help="the 10,000,000-row scale check (see the docstring)")
    parser.add_argument("--child", choices=["load", "mix", "breakdown"], help=argparse.SUPPRESS)
    parser.add_argument("--cache", help=argparse.SUPPRESS)
    parser.add_argument("--downstream", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", help=argparse.SUPPRESS)
    if "--large" in (sys.argv[1:] if argv is None else argv):  # the preset fills the defaults: an option beside it wins
        parser.set_defaults(rows=10_000_000, downstream_rows=1000, repeats=3, state="warm")
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Child: one measurement in a fresh process; prints one JSON line


def rss_kb(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in kB (0 where the field is missing)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon (the process's own memory, without file-backed pages) in a background thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak_kb = interval, rss_kb("RssAnon")
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stopped.wait(self.interval):
            self.peak_kb = max(self.peak_kb, rss_kb("RssAnon"))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stopped.set()
        self.thread.join()
        self.peak_kb = max(self.peak_kb, rss_kb("RssAnon"))


def child(args: argparse.Namespace) -> None:
    """One measurement (load, load+mix, or the breakdown) after the imports and a warm-up load; prints RESULT {json}."""
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import delia

    delia.load_conversations(args.warmup)  # untimed: the first load of a process pays one-time set-up inside datasets
    report = {
        "rss_after_imports_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_after_imports_mb": rss_kb("RssAnon") / 1024,
        "delia": os.path.dirname(delia.__file__),
    }
    if args.child == "breakdown":
        report["steps"] = breakdown(args)
        print("RESULT " + json.dumps(report), flush=True)
        return
    with AnonPeak() as anon:
        start = time.perf_counter()
        if args.child == "load":
            rows = len(delia.load_conversations(args.cache))
        else:
            rows = len(delia.mix_datasets(args.downstream, args.cache, ratio=args.ratio, seed=args.seed))
        report["seconds"] = time.perf_counter() - start
    report["rows"] = rows
    report["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report["peak_anon_mb"] = anon.peak_kb / 1024
    print("RESULT " + json.dumps(report), flush=True)


def breakdown(args: argparse.Namespace) -> dict[str, float]:
    """The steps of delia.data.prepare_datasets, timed one by one (same calls, same order)."""
    from datasets import Features, Value, concatenate_datasets

    from delia.data import forms, plan_mixture, read_dataset, validate_conversations

    steps, last = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name], last = now - last, now

    down, down_origin = read_dataset(args.downstream, "train dataset")
    forms.detect_form(down, "text", down_origin)
    forms.check_ends_with_assistant(down, down_origin)
    down = forms.split_final_reply(down)
    lap("downstream: read + check + split")
    cache, origin = read_dataset(args.cache, "diverse dataset")
    lap("cache: read (JSON -> Arrow, or memory-map)")
    forms.detect_form(cache)
    validate_conversations(cache, origin)
    lap("cache: validate every row")
    plan = plan_mixture(len(down), len(cache), args.ratio, args.seed, "auto")
    indices = plan.draw()
    lap("plan + draw indices")
    drawn = forms.split_final_reply(cache.select(indices))
    lap("select drawn rows + split off the final replies")
    features = Features({**down.features, "source": Value("string")})
    parts = [
        forms.conform(down, features, constants={"source": "downstream"}),
        forms.conform(drawn, features, constants={"source": "diverse"}),
    ]
    lap("align columns + tag sources")
    concatenate_datasets(parts).select(plan.order())
    lap("concatenate + interleave")
    return steps


# ----------------------------------------------------------------------------------------------------------------------
# Parent: write the data, run the children, report


def check_free_disk(folder: str, needed: int, rows: int) -> None:
    """Refuse to start when the JSONL and its Arrow copy would not fit, rather than fill the disk."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(
            f"FAIL: {folder} has {free / 2**30:.1f} GiB free; --rows {rows:,} needs about {needed / 2**30:.1f} "
            "GiB (the JSONL, its Arrow copy and a margin); pass --workdir on a larger disk or fewer --rows"
        )


def remove_map_outputs(hf_cache: str) -> None:
    """Delete the Arrow files `map` wrote next to the converted cache, keeping the conversion itself."""
    for path in glob.glob(os.path.join(hf_cache, "**", "cache-*.arrow"), recursive=True):
        os.remove(path)


class Children:
    """Starts the measurement processes on the files in `workdir`, and says which delia they measured."""

    def __init__(self, args: argparse.Namespace, workdir: str):
        self.args, self.workdir = args, workdir
        self.cache_path = os.path.join(workdir, "diverse.jsonl")
        self.downstream_path = os.path.join(workdir, "downstream.jsonl")
        self.warmup_path = os.path.join(workdir, "warmup.jsonl")
        self.delia_seen: set[str] = set()

    def run(self, kind: str, hf_cache: str) -> dict:
        """One child of `kind` with `hf_cache` as its HF_DATASETS_CACHE; its RESULT line, parsed."""
        args = self.args
        env = dict(os.environ, HF_DATASETS_CACHE=hf_cache, HF_DATASETS_DISABLE_PROGRESS_BARS="1")
        command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--cache", self.cache_path]
        command += ["--downstream", self.downstream_path, "--warmup", self.warmup_path, "--ratio", str(args.ratio)]
        command += ["--seed", str(args.seed)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            raise SystemExit(
                f"FAIL: {kind} child exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        result = json.loads(lines[-1][len("RESULT ") :])
        if result["delia"] not in self.delia_seen:
            self.delia_seen.add(result["delia"])
            print(f"measuring delia from {result['delia']}")
        return result

    def fresh_cache(self) -> str:
        """An empty HF_DATASETS_CACHE folder: the child pays the JSON -> Arrow conversion."""
        return tempfile.mkdtemp(prefix="hf-cold-", dir=self.workdir)

    def convert_once(self) -> str:
        """A HF_DATASETS_CACHE holding both files' Arrow conversion (made by a cold load+mix, printed, not counted)."""
        warm_cache = tempfile.mkdtemp(prefix="hf-warm-", dir=self.workdir)
        converted = self.run("mix", warm_cache)  # converts both JSONL files: a cold load+mix
        remove_map_outputs(warm_cache)
        convert_growth = converted["peak_anon_mb"] - converted["anon_after_imports_mb"]
        print(
            f"[warm] converted both files to Arrow once beforehand (a cold load+mix, not counted): "
            f"{converted['seconds']:.1f} s, {converted['rows']:,} rows, peak RSS {converted['peak_rss_mb']:.0f} MB, "
            f"peak own memory {converted['peak_anon_mb']:.0f} MB (+{convert_growth:.0f} during the call)"
        )
        return warm_cache


def measure_state(children: Children, state: str) -> tuple[float, float, float, float]:
    """--repeats of load and load+mix, alternating, in one state; (ratio, peak RSS, own growth, load+mix seconds)."""
    args = children.args
    times = {"load": [], "mix": []}
    mix_rss, after_imports, anon_growth = [], [], []
    warm_cache = None
    if state == "cold":  # in our runs the first child of a series ran slower: keep it out of the figures
        hf_cache = children.fresh_cache()
        warmup = children.run("load", hf_cache)
        shutil.rmtree(hf_cache)
        print(f"[cold] warm-up run of load (not counted): {warmup['seconds']:.2f} s")
    if state == "warm":
        warm_cache = children.convert_once()
    for repeat in range(args.repeats):
        for kind in ("load", "mix") if repeat % 2 == 0 else ("mix", "load"):
            hf_cache = warm_cache or children.fresh_cache()
            result = children.run(kind, hf_cache)
            if warm_cache:
                remove_map_outputs(warm_cache)
            else:
                shutil.rmtree(hf_cache)
            os.sync()
            times[kind].append(result["seconds"])
            after_imports.append(result["rss_after_imports_mb"])
            growth = result["peak_anon_mb"] - result["anon_after_imports_mb"]
            if kind == "mix":
                mix_rss.append(result["peak_rss_mb"])
                anon_growth.append(growth)
            print(
                f"[{state}] {'load+mix' if kind == 'mix' else 'load':>8}: {result['seconds']:7.2f} s, "
                f"{result['rows']:>9,} rows, peak RSS {result['peak_rss_mb']:6.0f} MB "
                f"({result['rss_after_imports_mb']:.0f} before the call), peak own memory "
                f"{result['peak_anon_mb']:6.0f} MB (+{growth:.0f} during the call)"
            )
    if args.breakdown:
        print_breakdown(children, state, warm_cache)
    elif warm_cache:
        shutil.rmtree(warm_cache)
    load, mix = statistics.median(times["load"]), statistics.median(times["mix"])
    print(
        f"[{state}] median load {load:.2f} s, median load+mix {mix:.2f} s, ratio {mix / load:.3f}; load+mix peak "
        f"RSS {max(mix_rss):.0f} MB ({statistics.median(after_imports):.0f} MB of it is the imports: torch, "
        f"transformers, trl), own memory grew by at most {max(anon_growth):.0f} MB during the call"
    )
    return mix / load, max(mix_rss), max(anon_growth), mix


def print_breakdown(children: Children, state: str, warm_cache: str | None) -> None:
    """One more child times the steps inside mix_datasets one by one; prints them (the cache folder is removed)."""
    hf_cache = warm_cache or children.fresh_cache()
    steps = children.run("breakdown", hf_cache)["steps"]
    total = sum(steps.values())
    print(f"[{state}] breakdown of one mix_datasets call, step by step ({total:.2f} s in all):")
    for name, seconds in steps.items():
        print(f"[{state}]     {name:<42} {seconds:6.2f} s {100 * seconds / total:5.1f} %")
    shutil.rmtree(hf_cache)


def write_files(args: argparse.Namespace, children: Children) -> float:
    """The cache, the downstream rows and the 4-row warm-up file; the cache's size in MiB."""
    check_free_disk(children.workdir, int(2.5 * MEAN_ROW_BYTES * args.rows) + 2**30, args.rows)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    write_synthetic_rows(children.cache_path, args.rows, rng)
    write_synthetic_rows(children.downstream_path, args.downstream_rows, rng, system_share=0.0)
    write_synthetic_rows(children.warmup_path, 4, rng, system_share=0.0)
    os.sync()  # write the new files back now, not while a measurement runs
    cache_mb = os.path.getsize(children.cache_path) / 2**20
    print(f"cache: {args.rows:,} rows, {cache_mb:.1f} MiB JSONL, written in {time.perf_counter() - start:.1f} s")
    drawn = round(args.ratio * args.downstream_rows)
    print(f"downstream: {args.downstream_rows} rows; ratio {args.ratio:g} -> {drawn:,} diverse rows drawn")
    return cache_mb


def main(argv: list[str] | None = None) -> None:
    """The parent: writes the files, measures each state in child processes, prints `ratio=` last."""
    args = parse_arguments(argv)
    if args.child:
        child(args)
        return
    states = [state.strip() for state in args.state.split(",") if state.strip()]
    assert states and set(states) <= {"cold", "warm"}, "--state takes cold, warm or cold,warm"
    assert args.repeats >= 1, "--repeats must be at least 1"
    workdir = args.workdir or tempfile.mkdtemp(prefix="delia-mixing-")
    os.makedirs(workdir, exist_ok=True)
    children = Children(args, workdir)
    try:
        cache_mb = write_files(args, children)
        summary = {state: measure_state(children, state) for state in states}
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    for state in states[1:]:
        print(f"[{state}] ratio={summary[state][0]:.3f}")
    ratio, peak_rss, own_growth, mix_seconds = summary[states[0]]
    print(
        f"ratio={ratio:.3f} load_mix_s={mix_seconds:.2f} peak_rss_mb={peak_rss:.0f} own_mem_growth_mb={own_growth:.0f} "
        f"cache_mb={cache_mb:.0f} rows={args.rows}"
    )


if __name__ == "__main__":
    main()
