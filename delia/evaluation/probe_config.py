"""`ProbeArguments` and the `delia probe` parser: nothing here imports torch, transformers or datasets.

The `delia` command answers `delia probe --help` and a mistyped option from this module, before `probe` (and torch)
is imported; `probe.main` reads its options with the same parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DESCRIPTION = (
    "`delia probe`: does the `<sep>` shorthand put the model in the same state as the instruction it stands for?"
)
EXPLICIT_FORMAT = (
    "the format of a Python dict with exactly two keys, 'thought' (your reasoning in one sentence) and "
    "'hallucination' ('yes' or 'no')"
)


@dataclass
class ProbeArguments:
    """`delia probe`'s options (the models to probe are named apart)."""

    base: str | None = field(default=None, metadata={"help": "base model of the adapters (default: their config's)"})
    prompts: str | None = field(default=None, metadata={"help": "DELIA conversations whose user turns use the token"})
    limit: int | None = field(default=None, metadata={"help": "use the first N prompts"})
    token: str = field(default="<sep>", metadata={"help": "the token that stands for the format"})
    explicit: str = field(default=EXPLICIT_FORMAT, metadata={"help": "the format written out, replacing the token"})
    output: str = field(default="runs/probe", metadata={"help": "folder for probe.json and probe.png"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace an earlier probe in --output (without it, an earlier one is refused)"}
    )
    batch_size: int = field(default=8, metadata={"help": "prompts per forward pass"})
    quantization: str = field(default="none", metadata={"help": "none (default), auto, 8bit or 4bit"})
    cpu_threads: int | None = field(
        default=None, metadata={"help": "torch threads on a CPU; unset: the cores other programs leave free"}
    )

    def __post_init__(self):
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"--{name} must be a whole number >= 1, got {value!r}")
        if self.cpu_threads is not None and (isinstance(self.cpu_threads, bool) or self.cpu_threads < 0):
            raise ValueError(f"--cpu_threads must be unset or a whole number >= 0, got {self.cpu_threads!r}")


def argument_parser() -> Any:
    """The `delia probe` parser: the models to probe, then every `ProbeArguments` field in both spellings."""
    from ..command_line import command_parser

    parser = command_parser(ProbeArguments, "delia probe", DESCRIPTION)
    parser.add_argument("models", nargs="+", help="model folders / hub names, or LoRA adapter (run) folders")
    return parser
