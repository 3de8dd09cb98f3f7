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

Every child imports the delia of this checkout (the repository root goes first on its PYTHONPATH), not an installed
one; the first result prints which.

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

# ----------------------------------------------------------------------------------------------------------------------
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
if "--large" in sys.argv[1:]:  # the preset fills the defaults, so an option given beside it still wins
    parser.set_defaults(rows=10_000_000, downstream_rows=1000, repeats=3, state="warm")
args = parser.parse_args()

# ----------------------------------------------------------------------------------------------------------------------
# Child: one measurement in a fresh process; prints one JSON line


def rss_kb(field: str) -> int:
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


def child() -> None:
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    import delia

    delia.load_conversations(args.warmup)  # untimed: the first load of a process pays one-time set-up inside datasets
    report = {
        "rss_after_imports_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "anon_after_imports_mb": rss_kb("RssAnon") / 1024,
        "delia": os.path.dirname(delia.__file__),
    }
    if args.child == "breakdown":
        report["steps"] = breakdown(args.downstream, args.cache)
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


def breakdown(downstream_path: str, cache_path: str) -> dict[str, float]:
    """The steps of delia.data.prepare_datasets, timed one by one (same calls, same order)."""
    from datasets import Features, Value, concatenate_datasets

    from delia.data import forms, plan_mixture, read_dataset, validate_conversations

    steps, last = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name], last = now - last, now

    down, down_origin = read_dataset(downstream_path, "train dataset")
    forms.detect_form(down, "text", down_origin)
    forms.check_ends_with_assistant(down, down_origin)
    down = forms.split_final_reply(down)
    lap("downstream: read + check + split")
    cache, origin = read_dataset(cache_path, "diverse dataset")
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


if args.child:
    child()
    sys.exit(0)

# ----------------------------------------------------------------------------------------------------------------------
# Parent: write the data, run the children, report

WORDS = (
    "the a of to and in is that for it as with on was by this be are from at or an have not sea river light "
    "answer question explain summarise translate write list reason because therefore however example code "
    "function value return data model train result number first second third cafe naive garcon 東京 données "
    "über straße ελληνικά"
).split()


def text_pool(rng: np.random.Generator, chars: int) -> str:
    words = rng.choice(np.array(WORDS, dtype=object), size=chars // 4)
    pool = " ".join(words)[:chars]
    assert not set(pool) & set('"\\'), "the pool is pasted into JSON strings unescaped"
    return pool


ROW_START = '{"messages": ['
SYSTEM_MESSAGE = '{"role": "system", "content": "You are a helpful assistant."}, '
USER_START = '{"role": "user", "content": "'
REPLY_START = '"}, {"role": "assistant", "content": "'
ROW_END = '"}]}\n'
MEAN_ROW_BYTES = 670  # measured on these rows: a guess at the file size before it is written


def write_rows(
    path: str, rows: int, rng: np.random.Generator, system_share: float = 0.05, chunk_rows: int = 500_000
) -> None:
    """Conversational rows with log-uniform lengths: user 10-500 characters, assistant 20-2000.

    The contents are slices of one random text pool (words with no quote or backslash, so no JSON escaping is
    needed) pasted into a fixed line template, half a million rows per write: 10,000,000 rows take minutes, not hours.
    """
    pool = text_pool(rng, 4_000_000)
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            user_len = np.exp(rng.uniform(np.log(10), np.log(500), count)).astype(int)
            reply_len = np.exp(rng.uniform(np.log(20), np.log(2000), count)).astype(int)
            user_at = rng.integers(0, len(pool) - 500, count)
            reply_at = rng.integers(0, len(pool) - 2000, count)
            with_system = rng.random(count) < system_share
            out.write(
                "".join(
                    ROW_START
                    + (SYSTEM_MESSAGE if system else "")
                    + USER_START
                    + (pool[u : u + u_len].strip() or "x")
                    + REPLY_START
                    + (pool[r : r + r_len].strip() or "x")
                    + ROW_END
                    for system, u, u_len, r, r_len in zip(
                        with_system.tolist(),
                        user_at.tolist(),
                        user_len.tolist(),
                        reply_at.tolist(),
                        reply_len.tolist(),
                        strict=True,
                    )
                )
            )


def check_free_disk(folder: str, needed: int) -> None:
    """Refuse to start when the JSONL and its Arrow copy would not fit, rather than fill the disk."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise SystemExit(
            f"FAIL: {folder} has {free / 2**30:.1f} GiB free; --rows {args.rows:,} needs about {needed / 2**30:.1f} "
            "GiB (the JSONL, its Arrow copy and a margin); pass --workdir on a larger disk or fewer --rows"
        )


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_child(kind: str, hf_cache: str) -> dict:
    # the checkout's delia, not whichever one is installed: the child's sys.path starts at benchmarks/
    python_path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, HF_DATASETS_CACHE=hf_cache, HF_DATASETS_DISABLE_PROGRESS_BARS="1", PYTHONPATH=python_path)
    command = [sys.executable, os.path.abspath(__file__), "--child", kind, "--cache", cache_path]
    command += ["--downstream", downstream_path, "--warmup", warmup_path, "--ratio", str(args.ratio)]
    command += ["--seed", str(args.seed)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"FAIL: {kind} child exited {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    result = json.loads(lines[-1][len("RESULT ") :])
    if result["delia"] not in delia_seen:
        delia_seen.add(result["delia"])
        print(f"measuring delia from {result['delia']}")
    return result


delia_seen: set[str] = set()


def remove_map_outputs(hf_cache: str) -> None:
    """Delete the Arrow files `map` wrote next to the converted cache, keeping the conversion itself."""
    for path in glob.glob(os.path.join(hf_cache, "**", "cache-*.arrow"), recursive=True):
        os.remove(path)


states = [state.strip() for state in args.state.split(",") if state.strip()]
assert states and set(states) <= {"cold", "warm"}, "--state takes cold, warm or cold,warm"
assert args.repeats >= 1, "--repeats must be at least 1"
workdir = args.workdir or tempfile.mkdtemp(prefix="delia-mixing-")
os.makedirs(workdir, exist_ok=True)
cache_path = os.path.join(workdir, "diverse.jsonl")
downstream_path = os.path.join(workdir, "downstream.jsonl")
warmup_path = os.path.join(workdir, "warmup.jsonl")
try:
    check_free_disk(workdir, int(2.5 * MEAN_ROW_BYTES * args.rows) + 2**30)
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    write_rows(cache_path, args.rows, rng)
    write_rows(downstream_path, args.downstream_rows, rng, system_share=0.0)
    write_rows(warmup_path, 4, rng, system_share=0.0)
    os.sync()  # write the new files back now, not while a measurement runs
    cache_mb = os.path.getsize(cache_path) / 2**20
    print(f"cache: {args.rows:,} rows, {cache_mb:.1f} MiB JSONL, written in {time.perf_counter() - start:.1f} s")
    drawn = round(args.ratio * args.downstream_rows)
    print(f"downstream: {args.downstream_rows} rows; ratio {args.ratio:g} -> {drawn:,} diverse rows drawn")

    summary = {}
    for state in states:
        times = {"load": [], "mix": []}
        mix_rss, after_imports, anon_growth = [], [], []
        warm_cache = None
        if state == "cold":  # in our runs the first child of a series ran slower: keep it out of the figures
            hf_cache = tempfile.mkdtemp(prefix="hf-cold-", dir=workdir)
            warmup = run_child("load", hf_cache)
            shutil.rmtree(hf_cache)
            print(f"[cold] warm-up run of load (not counted): {warmup['seconds']:.2f} s")
        if state == "warm":
            warm_cache = tempfile.mkdtemp(prefix="hf-warm-", dir=workdir)
            converted = run_child("mix", warm_cache)  # converts both JSONL files: a cold load+mix
            remove_map_outputs(warm_cache)
            convert_growth = converted["peak_anon_mb"] - converted["anon_after_imports_mb"]
            print(
                f"[warm] converted both files to Arrow once beforehand (a cold load+mix, not counted): "
                f"{converted['seconds']:.1f} s, {converted['rows']:,} rows, peak RSS {converted['peak_rss_mb']:.0f} MB, "
                f"peak own memory {converted['peak_anon_mb']:.0f} MB (+{convert_growth:.0f} during the call)"
            )
        for repeat in range(args.repeats):
            for kind in ("load", "mix") if repeat % 2 == 0 else ("mix", "load"):
                hf_cache = warm_cache or tempfile.mkdtemp(prefix="hf-cold-", dir=workdir)
                result = run_child(kind, hf_cache)
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
            hf_cache = warm_cache or tempfile.mkdtemp(prefix="hf-cold-", dir=workdir)
            steps = run_child("breakdown", hf_cache)["steps"]
            total = sum(steps.values())
            print(f"[{state}] breakdown of one mix_datasets call, step by step ({total:.2f} s in all):")
            for name, seconds in steps.items():
                print(f"[{state}]     {name:<42} {seconds:6.2f} s {100 * seconds / total:5.1f} %")
            shutil.rmtree(hf_cache)
        elif warm_cache:
            shutil.rmtree(warm_cache)
        load, mix = statistics.median(times["load"]), statistics.median(times["mix"])
        summary[state] = (mix / load, max(mix_rss), max(anon_growth), mix)
        print(
            f"[{state}] median load {load:.2f} s, median load+mix {mix:.2f} s, ratio {mix / load:.3f}; load+mix peak "
            f"RSS {max(mix_rss):.0f} MB ({statistics.median(after_imports):.0f} MB of it is the imports: torch, "
            f"transformers, trl), own memory grew by at most {max(anon_growth):.0f} MB during the call"
        )

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
