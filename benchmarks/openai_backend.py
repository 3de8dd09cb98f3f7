"""
build_cache through the openai backend, two comparisons on one stub: requests drained at every batch boundary (the
old loop) against requests kept in flight across batches (the backend); with --faults, a clean server against one that
injects 5% transient faults, same backend, same latencies.

The server: a stub OpenAI-compatible `/v1/chat/completions` endpoint on 127.0.0.1, started by this script in its own
process (`--serve`), that answers each request after a latency drawn uniformly from --min-latency .. --max-latency
(20-200 ms by default: a 10x spread, as replies of different lengths take on a real server). The latency is drawn
from a generator seeded with --seed and the query's text, so a query waits as long in every mode. The stub stops by
itself after the number of requests this run needs (plus a margin) or after --time-limit seconds, whichever is first;
it counts the requests it is answering at once (the most, and the mean over time), read back after each call.

Faults (--faults): each attempt at a query fails with probability --fault-rate (5%), drawn from a generator seeded
with --seed, the query and the attempt's number, after the query's usual latency, as one of six kinds in equal
shares: HTTP 503; HTTP 429 with Retry-After: 1; the connection dropped with no reply; HTTP 200 with an HTML error page;
HTTP 200 with a chat completion cut short and no Content-Length; HTTP 200 with JSON without `choices`. Every faulty
run meets the same faults. The backend retries with its default backoff (1 s, doubling; --backoff changes it, and is
printed), so each fault costs its request a second or more: what must not happen is that it holds back the others.

The modes, each a whole `build_cache` call (template plain, concurrency --concurrency, rows flushed and fsynced per
batch as usual):
    drained     the loop before the pipelined backend, reproduced here: each batch of batch_size requests is sent
                with min(concurrency, batch_size) in flight, and every reply of the batch is awaited before the next
                batch starts, so the slowest reply of each batch stalls the rest
    pipelined   the backend as it is: `concurrency` requests in flight throughout, rows written as replies come back
    clean       (--faults) the backend against the stub without faults, at the first batch size
    faults      (--faults) the backend against the same stub injecting faults, at the first batch size
Every run must write the same rows (compared as sorted lines: the backend writes them as they come back); the script
checks it.

Alternation: the configurations take turns for --rounds rounds, the order reversing each round; each call writes a
fresh output. Before the rounds, each runs once on a few queries, untimed. The table shows medians over rounds, from
the `seconds` of the returned CacheResult (the whole call). The last line: without --faults `speedup=`, drained
seconds over pipelined seconds at the first batch size (32, build_cache's default); with --faults `faults_vs_clean=`,
throughput with faults over throughput without (clean seconds over faulty seconds).

    python benchmarks/openai_backend.py                          # 640 queries, concurrency 16, batches 32, 16, 8
    python benchmarks/openai_backend.py --batch-sizes 32 --rounds 5
    python benchmarks/openai_backend.py --faults                 # clean against 5% faults, batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the delia next to this file
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

WARMUP_QUERIES = 32
MARGIN_REQUESTS = 64
FAULTS = ("503", "429", "drop", "html", "cut", "no_choices")
HTML = b"<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1><hr>nginx</body></html>"


def parse_arguments() -> argparse.Namespace:
    """The benchmark's settings (and --serve, for the stub's own process)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--queries", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 16, 8], help="the first (build_cache's default) is speedup="
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs every mode once)")
    parser.add_argument("--min-latency", type=float, default=0.02, help="seconds")
    parser.add_argument("--max-latency", type=float, default=0.2, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", action="store_true", help="clean against --fault-rate transient faults")
    parser.add_argument("--fault-rate", type=float, default=0.05, help="share of attempts that fault (--faults)")
    parser.add_argument("--backoff", type=float, default=None, help="the backend's first backoff (default: its own)")
    parser.add_argument("--time-limit", type=float, default=600, help="the stub stops after this many seconds")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # run the stub: at most N requests
    arguments = parser.parse_args()
    if min(arguments.queries, arguments.rounds, arguments.concurrency, *arguments.batch_sizes) < 1:
        parser.error("--queries, --rounds, --concurrency and --batch-sizes must be positive")
    if not 0 <= arguments.min_latency <= arguments.max_latency:
        parser.error("need 0 <= --min-latency <= --max-latency")
    if not 0 <= arguments.fault_rate < 1 or (arguments.backoff is not None and arguments.backoff < 0):
        parser.error("need 0 <= --fault-rate < 1 and --backoff >= 0")
    return arguments


# ----------------------------------------------------------------------------------------------------------------------
# The stub server (its own process)


class Stub(ThreadingHTTPServer):
    """Answers chat completions after a seeded latency, faulting as told; counts requests in flight; stops at a bound."""

    daemon_threads = True
    request_queue_size = 256  # every connection waits to be accepted (the default 5 drops some: 1 s SYN retries)

    def __init__(self, arguments: argparse.Namespace):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.arguments = arguments
        self.lock = threading.Lock()
        self.served = 0
        self.fault_rate = 0.0  # set by each GET /stats?faults=<rate>
        self.reset_stats()

    def reset_stats(self) -> None:
        """Start counting afresh, and every query's attempts with it (called with the lock held, or before serving)."""
        self.in_flight = self.max_in_flight = 0
        self.requests = 0
        self.area = 0.0  # integral of requests in flight over time
        self.since = self.last = time.perf_counter()
        self.attempts: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    def change_in_flight(self, step: int, query: str = "") -> str:
        """One request starts (+1, returns how it is answered: "ok" or a fault) or ends (-1)."""
        with self.lock:
            now = time.perf_counter()
            self.area += self.in_flight * (now - self.last)
            self.last = now
            self.in_flight += step
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if step < 0:
                return ""
            self.requests += 1
            self.served += 1
            if self.served >= self.arguments.serve:  # the bound on requests: stop after answering this one
                threading.Thread(target=self.shutdown, daemon=True).start()
            rng = random.Random(f"{self.arguments.seed}:{query}:{self.attempts[query]}")
            self.attempts[query] += 1
            kind = rng.choice(FAULTS) if rng.random() < self.fault_rate else "ok"
            self.faults[kind] += kind != "ok"
            return kind

    def latency(self, query: str) -> float:
        """The seeded latency of `query`: the same in every call, mode and attempt."""
        rng = random.Random(f"{self.arguments.seed}:{query}")
        return rng.uniform(self.arguments.min_latency, self.arguments.max_latency)


class StubHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions answers after the query's latency; GET /stats?faults=R returns and resets the counts."""

    server: Stub

    def do_POST(self) -> None:
        """One chat completion (the reply repeats the query), or the fault drawn for this attempt."""
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        query = body["messages"][-1]["content"]
        kind = self.server.change_in_flight(+1, query)
        try:
            time.sleep(self.server.latency(query))
        finally:
            self.server.change_in_flight(-1)  # before the reply goes out: the client's next request may follow at once
        message = {"role": "assistant", "content": f"An answer to: {query}"}
        usage = {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        completion = json.dumps({"object": "chat.completion", "choices": [choice], "usage": usage}).encode()
        if kind == "drop":
            return  # HTTP/1.0: the connection closes with no reply
        status, data, headers = {
            "ok": (200, completion, {}),
            "503": (503, b'{"error": {"message": "upstream restarting"}}', {}),
            "429": (429, b'{"error": {"message": "slow down"}}', {"Retry-After": "1"}),
            "html": (200, HTML, {"Content-Type": "text/html"}),
            "cut": (
                200,
                completion[: len(completion) // 2],
                {"Content-Length": None},
            ),  # ends where the connection does
            "no_choices": (200, b'{"object": "error", "message": "no healthy upstream"}', {}),
        }[kind]
        self.send_bytes(status, data, headers)

    def do_GET(self) -> None:
        """The counts since the last GET: requests, faults, most in flight at once, mean in flight over time."""
        rate = urllib.parse.parse_qs(urllib.parse.urlparse(self.path).query).get("faults", ["0"])[0]
        with self.server.lock:
            now = time.perf_counter()
            area = self.server.area + self.server.in_flight * (now - self.server.last)
            stats = {
                "requests": self.server.requests,
                "faults": dict(self.server.faults),
                "max_in_flight": self.server.max_in_flight,
                "mean_in_flight": area / max(now - self.server.since, 1e-9),
            }
            self.server.reset_stats()
            self.server.fault_rate = float(rate)
        self.send_bytes(200, json.dumps(stats).encode(), {})

    def send_bytes(self, status: int, data: bytes, headers: dict[str, str | None]) -> None:
        """A reply with `data` as its body: JSON and its Content-Length unless `headers` say otherwise (None: leave out)."""
        headers = {"Content-Type": "application/json", "Content-Length": str(len(data)), **headers}
        self.send_response(status)
        for name, value in headers.items():
            if value is not None:
                self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        """Quiet."""


def serve(arguments: argparse.Namespace) -> None:
    """Run the stub: print its port, serve until the request bound or the time limit, then stop."""
    server = Stub(arguments)
    print(server.server_address[1], flush=True)
    timer = threading.Timer(arguments.time_limit, server.shutdown)
    timer.daemon = True
    timer.start()
    server.serve_forever(poll_interval=0.05)
    server.server_close()


# ----------------------------------------------------------------------------------------------------------------------
# The old loop, reproduced: one batch at a time, drained before the next


def drained_stream(batch_size: int, pipelined: Callable) -> Callable:
    """OpenAIBackend.stream_unordered as the loop before pipelining ran it: batch by batch, each drained in full."""
    from delia.generation.base import Generation, Prompt, SamplingConfig

    def stream_unordered(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[tuple[int, Generation]]:
        for start in range(0, len(prompts), batch_size):  # build_cache called generate once per batch
            replies = sorted(pipelined(self, prompts[start : start + batch_size], sampling), key=lambda pair: pair[0])
            yield from ((start + position, reply) for position, reply in replies)  # build_cache then wrote the batch

    return stream_unordered


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark


def start_stub(arguments: argparse.Namespace, configurations: list[tuple[int, str]]) -> tuple[subprocess.Popen, str]:
    """The stub in its own process, bounded to what this run needs; returns it and its base URL."""
    retries = 2 if arguments.faults else 1  # room for the retries of faulty attempts
    bound = retries * len(configurations) * (arguments.rounds * arguments.queries + WARMUP_QUERIES) + MARGIN_REQUESTS
    command = [sys.executable, os.path.abspath(__file__), "--serve", str(bound)]
    for option in ("min_latency", "max_latency", "seed", "time_limit"):
        command += [f"--{option.replace('_', '-')}", str(getattr(arguments, option))]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    return server, f"http://127.0.0.1:{int(server.stdout.readline())}"


def make_runner(arguments: argparse.Namespace, base_url: str) -> Callable[[int, str, str, str], dict]:
    """run(batch_size, mode, query_file, output): one build_cache call in `mode`, with the stub's counts."""
    from delia.build_cache import build_cache
    from delia.generation.openai_backend import OpenAIBackend

    pipelined = OpenAIBackend.stream_unordered
    extra = {} if arguments.backoff is None else {"backoff": arguments.backoff}

    def stats(fault_rate: float = 0.0) -> dict:
        with urllib.request.urlopen(f"{base_url}/stats?faults={fault_rate}", timeout=10) as response:
            return json.loads(response.read())

    def run(batch_size: int, mode: str, query_file: str, output: str) -> dict:
        if mode == "drained":
            OpenAIBackend.stream_unordered = drained_stream(batch_size, pipelined)
        try:
            stats(arguments.fault_rate if mode == "faults" else 0.0)  # reset the stub's counts, set its faults
            result = build_cache(
                "stub",
                query_file,
                output,
                template="plain",
                base_urls=base_url,
                concurrency=arguments.concurrency,
                batch_size=batch_size,
                max_new_tokens=8,
                seed=arguments.seed,
                progress=False,
                backend_options=extra,
            )
        finally:
            OpenAIBackend.stream_unordered = pipelined
        counts = {"seconds": result.seconds, "written": result.written, "invalid": result.invalid_replies_retried}
        return {**counts, "output": output, **stats()}

    return run


def run_rounds(arguments: argparse.Namespace, configurations: list[tuple[int, str]], run: Callable) -> dict:
    """Every configuration once untimed on a few queries, then --rounds timed rounds; checks rows, returns the runs."""
    results: dict[tuple[int, str], list[dict]] = {configuration: [] for configuration in configurations}
    with tempfile.TemporaryDirectory(prefix="delia-openai-backend-") as workdir:
        query_file = os.path.join(workdir, "queries.jsonl")
        warmup_file = os.path.join(workdir, "warmup.jsonl")
        write_queries(query_file, arguments.queries, "Query")
        write_queries(warmup_file, WARMUP_QUERIES, "Warm-up query")
        for size, mode in configurations:
            run(size, mode, warmup_file, os.path.join(workdir, f"warmup-{size}-{mode}.jsonl"))
        for round_index in range(arguments.rounds):
            order = configurations if round_index % 2 == 0 else list(reversed(configurations))
            line = []
            for size, mode in order:
                result = run(size, mode, query_file, os.path.join(workdir, f"{size}-{mode}-{round_index}.jsonl"))
                faulty = sum(result["faults"].values())
                if result["written"] != arguments.queries or result["requests"] != arguments.queries + faulty:
                    raise SystemExit(f"FAIL: {mode}: expected {arguments.queries} rows and requests, got {result}")
                results[(size, mode)].append(result)
                line.append(f"{mode} {size} {result['seconds']:.2f} s" + (f" ({faulty} faults)" if faulty else ""))
            print(f"round {round_index + 1}/{arguments.rounds}: " + ", ".join(line), flush=True)
        rows = {tuple(sorted(Path(r["output"]).read_text().splitlines())) for runs in results.values() for r in runs}
        if len(rows) != 1:
            raise SystemExit("FAIL: the runs wrote different rows")
    return results


def print_table(arguments: argparse.Namespace, results: dict) -> dict[tuple[int, str], float]:
    """The table of medians; returns the median seconds of each configuration."""
    print()
    print(
        f"{'batch':>5} {'mode':<10} {'seconds':>8} {'range':>12} {'queries/s':>10} {'in flight: max':>15} {'mean':>6}"
        + (f" {'faults':>7} {'invalid 200s retried':>21}" if arguments.faults else "")
    )
    seconds = {}
    for (size, mode), runs in results.items():
        seconds[(size, mode)] = statistics.median(result["seconds"] for result in runs)
        low, high = min(result["seconds"] for result in runs), max(result["seconds"] for result in runs)
        most = max(result["max_in_flight"] for result in runs)
        mean = statistics.median(result["mean_in_flight"] for result in runs)
        rate = arguments.queries / seconds[(size, mode)]
        faults = statistics.median(sum(result["faults"].values()) for result in runs)
        invalid = statistics.median(result["invalid"] for result in runs)
        print(
            f"{size:>5} {mode:<10} {seconds[(size, mode)]:>8.2f} {low:>5.2f}-{high:<6.2f} {rate:>10.0f} {most:>15} "
            f"{mean:>6.1f}" + (f" {faults:>7.0f} {invalid:>21.0f}" if arguments.faults else "")
        )
    print("seconds: the whole build_cache call (CacheResult.seconds), median over rounds; in flight: at the stub")
    print("same rows in every run: yes (compared as sorted lines)")
    return seconds


def main() -> None:
    """Start the stub, run the modes in alternation, print the table and the ratio."""
    arguments = parse_arguments()
    if arguments.serve is not None:
        serve(arguments)
        return
    from delia.generation.openai_backend import DEFAULT_BACKOFF

    if arguments.faults:
        configurations = [(arguments.batch_sizes[0], mode) for mode in ("clean", "faults")]
    else:
        configurations = [(size, mode) for size in arguments.batch_sizes for mode in ("drained", "pipelined")]
    server, base_url = start_stub(arguments, configurations)
    try:
        print(
            f"{arguments.queries} queries, concurrency {arguments.concurrency}, batch sizes "
            f"{', '.join(str(size) for size, _ in configurations[::2])}, stub latency {1000 * arguments.min_latency:.0f}-"
            f"{1000 * arguments.max_latency:.0f} ms (uniform, seed {arguments.seed}), {arguments.rounds} rounds"
            + (
                f", faults {100 * arguments.fault_rate:g}% of attempts ({', '.join(FAULTS)}), backoff "
                f"{DEFAULT_BACKOFF if arguments.backoff is None else arguments.backoff:g} s"
                if arguments.faults
                else ""
            )
        )
        results = run_rounds(arguments, configurations, make_runner(arguments, base_url))
    finally:
        server.terminate()
        server.wait(timeout=10)
    seconds = print_table(arguments, results)
    if arguments.faults:
        size = arguments.batch_sizes[0]
        print(f"faults_vs_clean={seconds[(size, 'clean')] / seconds[(size, 'faults')]:.2f}")
        return
    speedups = {size: seconds[(size, "drained")] / seconds[(size, "pipelined")] for size in arguments.batch_sizes}
    print(
        "speedup (drained seconds / pipelined seconds): " + ", ".join(f"batch {s} {x:.2f}" for s, x in speedups.items())
    )
    print(f"speedup={speedups[arguments.batch_sizes[0]]:.2f}")


def write_queries(path: str, count: int, prefix: str) -> None:
    """`count` distinct queries as {"messages": [user, assistant]} rows."""
    with open(path, "w", encoding="utf-8") as out:
        for index in range(count):
            messages = [
                {"role": "user", "content": f"{prefix} {index}: name something that is blue."},
                {"role": "assistant", "content": "The sea."},
            ]
            out.write(json.dumps({"messages": messages}) + "\n")


if __name__ == "__main__":
    main()
