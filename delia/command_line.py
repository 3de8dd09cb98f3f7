"""How every `delia` command reads its options: dataclasses through `HfArgumentParser`, and one line on a bad value.

`HfArgumentParser` accepts each field as `--snake_case` and `--kebab-case`, and (TRL's `TrlParser`) a YAML recipe
with `--config`. argparse answers a bad value with the whole usage text before the error; delia's commands answer
with the error alone, naming the command and pointing at `--help`.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn


def one_line_errors(parser: Any) -> Any:
    """Make `parser` report a bad option or value in one line on stderr (exit status 2), without the usage dump."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see {parser.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error
    return parser


def command_parser(dataclass_types: Any, prog: str, description: str | None = None, recipes: bool = False) -> Any:
    """The parser of one command: its options dataclasses (both spellings), one-line errors, `--config` if `recipes`."""
    if recipes:
        from trl import TrlParser

        return one_line_errors(TrlParser(dataclass_types, prog=prog, description=description))
    from transformers import HfArgumentParser

    return one_line_errors(HfArgumentParser(dataclass_types, prog=prog, description=description))
