"""`EvalArguments` and the `delia eval` parser: nothing here imports torch, transformers or datasets.

The `delia` command answers `delia eval --help` and a mistyped option from this module, before `evaluate` (and
torch) is imported; `evaluate.main` reads its options with the same parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..bundled import DEFAULT_EVAL_DATASET, DEFAULT_GENERAL_QUERIES
from .contrast import DO_NOT_INSTRUCTIONS, MIN_FOLLOW_RATE

DESCRIPTION = "`delia eval`: measure what DELIA claims on a model, an adapter or a run folder, and compare runs."
EVAL_DATASET_HELP = (
    "eval conversations in the <sep> format (the default: the 16 bundled rows; from a clone, "
    "reproduce_checkpoint/eval_dataset.jsonl has all 30)"
)


@dataclass
class EvalArguments:
    """How `delia eval` and `delia sweep` evaluate; each command names the model and the eval set itself."""

    general_queries: str = field(
        default=DEFAULT_GENERAL_QUERIES,
        metadata={
            "help": "general queries with reference answers, for the general NLL (the default: the 128 bundled ones)"
        },
    )
    no_general: bool = field(default=False, metadata={"help": "skip the general NLL"})
    exclude_cache: list[str] | None = field(
        default=None,
        metadata={
            "help": "diverse caches whose queries are not held out (none given: the run's own cache, when its "
            "delia_mixture.json names one)"
        },
    )
    do_not: list[str] | None = field(
        default=None,
        metadata={"help": "instructions saying not to use the <sep> format (none given: three built-in ones)"},
    )
    max_new_tokens: int = field(default=256, metadata={"help": "tokens generated per answer at most"})
    temperature: float = field(default=0.0, metadata={"help": "0 means greedy (the default)"})
    generation_batch_size: int = field(default=16, metadata={"help": "prompts per generate call"})
    min_follow_rate: float = field(
        default=MIN_FOLLOW_RATE, metadata={"help": "below this dict rate the format counts as not learned"}
    )
    limit: int | None = field(default=None, metadata={"help": "evaluate only the first N eval rows"})
    bf16_generation: bool | None = field(
        default=None,
        metadata={"help": "generate under bf16 autocast (unset: on a CPU with native bf16; ~1.8x faster there)"},
    )

    def __post_init__(self):
        for name in ("max_new_tokens", "generation_batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"--{name} must be a positive integer, got {value!r}")
        if self.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {self.temperature!r}")
        if not 0 <= self.min_follow_rate <= 1:
            raise ValueError(f"--min_follow_rate must be between 0 and 1, got {self.min_follow_rate!r}")

    def data_options(self) -> dict[str, Any]:
        """The keyword arguments of `load_eval_data` these settle (not the eval set and the excluded caches)."""
        return {"general_queries": None if self.no_general else self.general_queries, "limit": self.limit}

    def generation_options(self) -> dict[str, Any]:
        """The keyword arguments of `evaluate_model` these settle."""
        return {
            "do_not_instructions": self.do_not or DO_NOT_INSTRUCTIONS,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "batch_size": self.generation_batch_size,
            "min_follow_rate": self.min_follow_rate,
            "bf16_generation": self.bf16_generation,
        }


def _thread_count(text: str) -> int:
    """--cpu_threads: a whole number >= 0 (argparse names the option with this message)."""
    import argparse

    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def argument_parser() -> Any:
    """The `delia eval` parser: the target (or `--compare`), the model and data options, then `EvalArguments`."""
    from ..command_line import command_parser

    parser = command_parser(EvalArguments, "delia eval", DESCRIPTION)
    parser.add_argument("target", nargs="?", help="a run folder, an adapter folder, a model folder or a hub name")
    parser.add_argument("--compare", nargs="+", metavar="RUN", help="print these runs' reports side by side")
    parser.add_argument("--output", default=None, help="folder for the report (none given: the target folder)")
    parser.add_argument("--eval_dataset", "--eval-dataset", default=DEFAULT_EVAL_DATASET, help=EVAL_DATASET_HELP)
    parser.add_argument("--train_dataset", "--train-dataset", default=None, help="training rows: seen vs unseen")
    parser.add_argument(
        "--base_model", "--base-model", default=None, help="an adapter's base (none given: its config's)"
    )
    parser.add_argument("--quantization", default="none", help="none (default), 8bit, 4bit or auto")
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (used when --temperature > 0)")
    parser.add_argument("--trust_remote_code", "--trust-remote-code", action="store_true")
    parser.add_argument(
        "--cpu_threads",
        "--cpu-threads",
        type=_thread_count,
        default=None,
        help="torch threads on a CPU (unset: the cores other programs leave free, looked up per batch; 0: torch's)",
    )
    return parser
