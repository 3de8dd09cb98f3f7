"""
build_cache through the openai backend: requests drained at every batch boundary (the old loop) against requests kept
in flight across batches (the pipelined backend), at the same concurrency, on the same queries, against one stub.

The server: a stub OpenAI-compatible `/v1/chat/completions` endpoint on 127.0.0.1, started by this script in its own
process (`--serve`), that answers each request after a latency drawn uniformly from --min-latency .. --max-latency
(20-200 ms by default: a 10x spread, as replies of different lengths take on a real server). The latency is drawn
from a generator seeded with --seed and the query's text, so a query waits as long in both modes. The stub stops by
itself after the number of requests this run needs (plus a margin) or after --time-limit seconds, whichever is first;
it counts the requests it is answering at once (the most, and the mean over time), read back after each call.

The two modes, both a whole `build_cache` call (template plain, concurrency --concurrency, each batch size of
--batch-sizes in turn, rows flushed and fsynced per batch as usual):
    drained     the loop before the pipelined backend, reproduced here: each batch of batch_size requests is sent
                through a pool of min(concurrency, batch_size) threads, and every reply of the batch is awaited
                before the next batch starts, so the slowest reply of each batch stalls the rest
    pipelined   the backend as it is: `concurrency` requests in flight throughout; replies are written in query
                order (a reply that comes back early waits in a reorder buffer)
Both must write the same file (same rows, same order); the script checks it.

With a batch of 32 and 16 threads, the drained loop keeps 16 requests in flight until the batch's last 16 are out,
then fewer and fewer; with a batch of 16 it waits for the slowest of 16 each time; with a batch of 8 it never has more
than 8 in flight. The pipelined backend does the same at any batch size.

Alternation: the configurations take turns for --rounds rounds, the order reversing each round; each call writes a
fresh output. Before the rounds, each runs once on a few queries, untimed. The table shows medians over rounds, from
the `seconds` of the returned CacheResult (the whole call); the last line is the speedup, drained seconds over
pipelined seconds, at the first batch size (32, build_cache's default).

    python benchmarks/openai_backend.py                          # 640 queries, concurrency 16, batches 32, 16, 8
    python benchmarks/openai_backend.py --batch-sizes 32 --rounds 5
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
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the delia next to this file
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

WARMUP_QUERIES = 32
MARGIN_REQUESTS = 64


def parse_arguments() -> argparse.Namespace:
    """The benchmark's settings (and --serve, for the stub's own process)."""
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--queries", type=int, default=640)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[32, 16, 8], help="the first (build_cache's default) is speedup="
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds (each runs both modes once)")
    parser.add_argument("--min-latency", type=float, default=0.02, help="seconds")
    parser.add_argument("--max-latency", type=float, default=0.2, help="seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-limit", type=float, default=600, help="the stub stops after this many seconds")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)  # run the stub: at most N requests
    arguments = parser.parse_args()
    if min(arguments.queries, arguments.rounds, arguments.concurrency, *arguments.batch_sizes) < 1:
        parser.error("--queries, --rounds, --concurrency and --batch-sizes must be positive")
    if not 0 <= arguments.min_latency <= arguments.max_latency:
        parser.error("need 0 <= --min-latency <= --max-latency")
    return arguments


# ----------------------------------------------------------------------------------------------------------------------
# The stub server (its own process)


class Stub(ThreadingHTTPServer):
    """Answers chat completions after a seeded latency; counts requests in flight; stops itself when its bound is hit."""

    daemon_threads = True
    request_queue_size = 256  # every connection waits to be accepted (the default 5 drops some: 1 s SYN retries)

    def __init__(self, arguments: argparse.Namespace):
        super().__init__(("127.0.0.1", 0), StubHandler)
        self.arguments = arguments
        self.lock = threading.Lock()
        self.served = 0
        self.reset_stats()

    def reset_stats(self) -> None:
        """Start counting afresh (called with the lock held, or before serving)."""
        self.in_flight = self.max_in_flight = 0
        self.requests = 0
        self.area = 0.0  # integral of requests in flight over time
        self.since = self.last = time.perf_counter()

    def change_in_flight(self, step: int) -> None:
        """One request starts (+1) or ends (-1)."""
        with self.lock:
            now = time.perf_counter()
            self.area += self.in_flight * (now - self.last)
            self.last = now
            self.in_flight += step
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if step > 0:
                self.requests += 1
                self.served += 1
                if self.served >= self.arguments.serve:  # the bound on requests: stop after answering this one
                    threading.Thread(target=self.shutdown, daemon=True).start()

    def latency(self, query: str) -> float:
        """The seeded latency of `query`: the same in every call and mode."""
        rng = random.Random(f"{self.arguments.seed}:{query}")
        return rng.uniform(self.arguments.min_latency, self.arguments.max_latency)


class StubHandler(BaseHTTPRequestHandler):
    """POST /v1/chat/completions answers after the query's latency; GET /stats returns and resets the counts."""

    server: Stub

    def do_POST(self) -> None:
        """One chat completion: the reply repeats the query."""
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        query = body["messages"][-1]["content"]
        self.server.change_in_flight(+1)
        try:
            time.sleep(self.server.latency(query))
        finally:
            self.server.change_in_flight(-1)  # before the reply goes out: the client's next request may follow at once
        message = {"role": "assistant", "content": f"An answer to: {query}"}
        usage = {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}
        choice = {"index": 0, "message": message, "finish_reason": "stop"}
        self.send_json({"object": "chat.completion", "choices": [choice], "usage": usage})

    def do_GET(self) -> None:
        """The counts since the last GET: requests, most in flight at once, mean in flight over time."""
        with self.server.lock:
            now = time.perf_counter()
            area = self.server.area + self.server.in_flight * (now - self.server.last)
            stats = {
                "requests": self.server.requests,
                "max_in_flight": self.server.max_in_flight,
                "mean_in_flight": area / max(now - self.server.since, 1e-9),
            }
            self.server.reset_stats()
        self.send_json(stats)

    def send_json(self, payload: dict) -> None:
        """A 200 reply with a JSON body."""
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
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
# The old loop, reproduced: one pool per batch, drained before the next batch


def drained_stream(batch_size: int):
    """OpenAIBackend.stream as the loop before pipelining ran it: batch by batch, each drained before the next."""
    from delia.generation.base import Generation, Prompt, SamplingConfig

    def stream(self, prompts: Sequence[Prompt], sampling: SamplingConfig) -> Iterator[Generation]:
        for start in range(0, len(prompts), batch_size):  # build_cache called generate once per batch
            batch = prompts[start : start + batch_size]
            abort = threading.Event()
            pool = ThreadPoolExecutor(max_workers=min(self.concurrency, len(batch)))
            try:
                futures = [pool.submit(self._complete, i, prompt, sampling, abort) for i, prompt in enumerate(batch)]
                wait(futures, return_when=FIRST_EXCEPTION)
                for future in futures:
                    if future.done() and future.exception() is not None:
                        abort.set()
                        raise future.exception()
                replies = [future.result() for future in futures]
            finally:
                pool.shutdown(wait=not abort.is_set(), cancel_futures=True)
            yield from replies  # build_cache then wrote the batch

    return stream


# ----------------------------------------------------------------------------------------------------------------------
# The benchmark


def main() -> None:
    """Start the stub, run both modes in alternation at each batch size, print the table and the speedup."""
    arguments = parse_arguments()
    if arguments.serve is not None:
        serve(arguments)
        return

    from delia.build_cache import build_cache
    from delia.generation.openai_backend import OpenAIBackend

    pipelined_stream = OpenAIBackend.stream
    configurations = [(size, mode) for size in arguments.batch_sizes for mode in ("drained", "pipelined")]
    bound = len(configurations) * (arguments.rounds * arguments.queries + WARMUP_QUERIES) + MARGIN_REQUESTS
    command = [sys.executable, os.path.abspath(__file__), "--serve", str(bound)]
    for option in ("min_latency", "max_latency", "seed", "time_limit"):
        command += [f"--{option.replace('_', '-')}", str(getattr(arguments, option))]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        base_url = f"http://127.0.0.1:{int(server.stdout.readline())}"

        def stats() -> dict:
            with urllib.request.urlopen(f"{base_url}/stats", timeout=10) as response:
                return json.loads(response.read())

        def run(batch_size: int, mode: str, query_file: str, output: str) -> dict:
            OpenAIBackend.stream = drained_stream(batch_size) if mode == "drained" else pipelined_stream
            try:
                stats()  # reset the stub's counts
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
                )
            finally:
                OpenAIBackend.stream = pipelined_stream
            return {"seconds": result.seconds, "written": result.written, "output": output, **stats()}

        print(
            f"{arguments.queries} queries, concurrency {arguments.concurrency}, batch sizes "
            f"{', '.join(map(str, arguments.batch_sizes))}, stub latency {1000 * arguments.min_latency:.0f}-"
            f"{1000 * arguments.max_latency:.0f} ms (uniform, seed {arguments.seed}), {arguments.rounds} rounds"
        )
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
                    output = os.path.join(workdir, f"{size}-{mode}-{round_index}.jsonl")
                    result = run(size, mode, query_file, output)
                    if result["written"] != arguments.queries or result["requests"] != arguments.queries:
                        raise SystemExit(f"FAIL: {mode}: expected {arguments.queries} rows and requests, got {result}")
                    results[(size, mode)].append(result)
                    line.append(f"{mode} {size} {result['seconds']:.2f} s")
                print(f"round {round_index + 1}/{arguments.rounds}: " + ", ".join(line), flush=True)
            outputs = {Path(result["output"]).read_bytes() for runs in results.values() for result in runs}
            if len(outputs) != 1:
                raise SystemExit("FAIL: the runs wrote different files")
    finally:
        server.terminate()
        server.wait(timeout=10)

    print()
    print(
        f"{'batch':>5} {'mode':<10} {'seconds':>8} {'range':>12} {'queries/s':>10} {'in flight: max':>15} {'mean':>6}"
    )
    seconds = {}
    for (size, mode), runs in results.items():
        seconds[(size, mode)] = statistics.median(result["seconds"] for result in runs)
        low, high = min(result["seconds"] for result in runs), max(result["seconds"] for result in runs)
        most = max(result["max_in_flight"] for result in runs)
        mean = statistics.median(result["mean_in_flight"] for result in runs)
        rate = arguments.queries / seconds[(size, mode)]
        print(
            f"{size:>5} {mode:<10} {seconds[(size, mode)]:>8.2f} {low:>5.2f}-{high:<6.2f} {rate:>10.0f} {most:>15} "
            f"{mean:>6.1f}"
        )
    print("seconds: the whole build_cache call (CacheResult.seconds), median over rounds; in flight: at the stub")
    print("identical output files: yes (every run wrote the same rows in the same order)")
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
