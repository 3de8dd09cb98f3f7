"""The set-up every benchmark shares: this checkout's delia on the import path, quiet libraries, synthetic rows, timing.

Every benchmark runs as `python benchmarks/NAME.py`, so Python puts benchmarks/ first on sys.path and
`from harness import ...` finds this file. Importing it puts the checkout's root ahead of site-packages, so a
benchmark measures the delia next to it, not an installed one (and a child process started from a benchmark file
does the same when it imports this module); `delia_origin()` says which one was imported. Import it before any
`delia` import: isort's order does that by itself (this module sorts with the third-party imports, delia after them).

Only the standard library is imported at the top: mixing.py measures its own imports and memory, and torch,
transformers and datasets load inside the functions that need them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]  # the checkout: its delia, and the bundled data the benchmarks read
if sys.path[0] != str(ROOT):
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

BUNDLED_JUDGEMENTS = ROOT / "reproduce_checkpoint" / "train_dataset.jsonl"  # downstream `<sep>` rows
BUNDLED_EVAL_JUDGEMENTS = ROOT / "reproduce_checkpoint" / "eval_dataset.jsonl"
BUNDLED_QUERY_CACHE = ROOT / "reproduce_self_sample" / "query_cache.jsonl"  # diverse rows: the bundled query cache


def delia_origin() -> str:
    """The folder of the delia this process imported, and whether it is this checkout's."""
    import delia

    folder = Path(delia.__file__).resolve().parent
    return f"{folder} ({'this checkout' if folder.parent == ROOT else 'NOT this checkout: an installed copy'})"


def announce_delia() -> None:
    """Print which delia the benchmark measures, so a result never silently comes from an installed copy."""
    print(f"delia: {delia_origin()}")


def quiet(threads: int = 0) -> None:
    """Errors only from transformers, warnings and up from delia, no progress bars, no Python warnings.

    `threads` > 0 sets torch's intra-op thread count for the calling thread (0 keeps torch's default). The benchmarks
    print their own lines; library chatter would bury them.
    """
    import datasets
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    logging.getLogger("delia").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    if threads > 0:
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------------------------------
# Rows


def conversation(user: str, assistant: str) -> dict:
    """One conversational row: a user turn and the assistant's reply."""
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Rows as JSON lines (non-ASCII text kept as it is)."""
    with open(path, "w", encoding="utf-8") as out:
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_jsonl(*paths: str | os.PathLike) -> list[dict]:
    """The rows of each JSON-lines file, in order."""
    return [json.loads(line) for path in paths for line in Path(path).read_text(encoding="utf-8").splitlines()]


WORDS = (
    "the a of to and in is that for it as with on was by this be are from at or an have not sea river light "
    "answer question explain summarise translate write list reason because therefore however example code "
    "function value return data model train result number first second third cafe naive garcon 東京 données "
    "über straße ελληνικά"
).split()
ROW_START = '{"messages": ['
SYSTEM_MESSAGE = '{"role": "system", "content": "You are a helpful assistant."}, '
USER_START = '{"role": "user", "content": "'
REPLY_START = '"}, {"role": "assistant", "content": "'
ROW_END = '"}]}\n'
MEAN_ROW_BYTES = 670  # measured on these rows: a guess at the file size before it is written


def text_pool(rng: Any, chars: int) -> str:
    """`chars` characters of random words from WORDS (none has a quote or backslash: no JSON escaping needed)."""
    import numpy as np

    words = rng.choice(np.array(WORDS, dtype=object), size=chars // 4)
    pool = " ".join(words)[:chars]
    assert not set(pool) & set('"\\'), "the pool is pasted into JSON strings unescaped"
    return pool


def write_synthetic_rows(path: str, rows: int, rng: Any, system_share: float = 0.05, chunk_rows: int = 500_000) -> None:
    """Conversational rows with log-uniform lengths: user 10-500 characters, assistant 20-2000.

    A share `system_share` of the rows starts with a system message. The contents are slices of one random text pool
    pasted into a fixed line template, half a million rows per write: 10,000,000 rows take minutes, not hours (a
    json.dumps per row would take most of a benchmark's time on a large cache). `rng` is a numpy Generator.
    """
    import numpy as np

    pool = text_pool(rng, 4_000_000)
    with open(path, "w", encoding="utf-8") as out:
        for start in range(0, rows, chunk_rows):
            count = min(chunk_rows, rows - start)
            user_len = np.exp(rng.uniform(np.log(10), np.log(500), count)).astype(int).tolist()
            reply_len = np.exp(rng.uniform(np.log(20), np.log(2000), count)).astype(int).tolist()
            user_at = rng.integers(0, len(pool) - 500, count).tolist()
            reply_at = rng.integers(0, len(pool) - 2000, count).tolist()
            with_system = (rng.random(count) < system_share).tolist()
            out.write(
                "".join(
                    ROW_START
                    + (SYSTEM_MESSAGE if with_system[i] else "")
                    + USER_START
                    + (pool[user_at[i] : user_at[i] + user_len[i]].strip() or "x")
                    + REPLY_START
                    + (pool[reply_at[i] : reply_at[i] + reply_len[i]].strip() or "x")
                    + ROW_END
                    for i in range(count)
                )
            )


# ----------------------------------------------------------------------------------------------------------------------
# Timing


def timed(function: Callable, *arguments: Any, **keywords: Any) -> tuple[Any, float]:
    """(function's result, wall seconds it took)."""
    start = time.perf_counter()
    result = function(*arguments, **keywords)
    return result, time.perf_counter() - start


def rotated(names: list[str], round_index: int) -> list[str]:
    """`names` starting at position round_index (modulo): each configuration goes first in turn, round by round."""
    shift = round_index % len(names)
    return names[shift:] + names[:shift]
