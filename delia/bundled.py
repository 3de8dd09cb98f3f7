"""The data shipped with delia (`delia/demo_data/`) and, in a clone, the reproduction's rows: one place for their paths.

- `downstream.jsonl`: the demo's downstream `<sep>` rows (training).
- `eval.jsonl`: the default eval set (the first rows of `reproduce_checkpoint/eval_dataset.jsonl`).
- `queries.jsonl`: general queries, the demo's self-sampling input and `delia eval`'s held-out general set.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

DEMO_DATA = files("delia") / "demo_data"
DEMO_FILES = ("downstream.jsonl", "eval.jsonl", "queries.jsonl")


def demo_file(name: str) -> str:
    """Path of a bundled demo file: downstream.jsonl, eval.jsonl or queries.jsonl."""
    if name not in DEMO_FILES:
        raise ValueError(f"no bundled demo file {name!r}; the bundled files are {', '.join(DEMO_FILES)}")
    return str(DEMO_DATA / name)


DEFAULT_EVAL_DATASET = demo_file("eval.jsonl")
DEFAULT_GENERAL_QUERIES = demo_file("queries.jsonl")
DEMO_DOWNSTREAM = demo_file("downstream.jsonl")


def reproduction_file(name: str) -> Path | None:
    """`reproduce_checkpoint/<name>` of a clone of the repository, or None in an installed package."""
    path = Path(__file__).resolve().parents[1] / "reproduce_checkpoint" / name
    return path if path.is_file() else None


def default_probe_prompts() -> str:
    """The bundled eval set for `delia probe`: reproduce_checkpoint/eval_dataset.jsonl in a clone, else the demo's."""
    return str(reproduction_file("eval_dataset.jsonl") or DEFAULT_EVAL_DATASET)
