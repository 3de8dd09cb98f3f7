"""How every `delia` command reads its options: dataclasses through `HfArgumentParser`, and one line on a bad value.

`HfArgumentParser` accepts each field as `--snake_case` and `--kebab-case`, and (TRL's `TrlParser`) a YAML recipe
with `--config`. argparse answers a bad value with the whole usage text before the error; delia's commands answer
with the error alone, naming the command and pointing at `--help`.
"""

from __future__ import annotations

import os
import re
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


def _recipe_path(argv: list[str]) -> str | None:
    """The value of `--config` in `argv` (`--config PATH` or `--config=PATH`), if any."""
    for index, argument in enumerate(argv):
        if argument == "--config" and index + 1 < len(argv):
            return argv[index + 1]
        if argument.startswith("--config="):
            return argument.split("=", 1)[1]
    return None


def _check_recipe(path: str) -> None:
    """One line for a recipe that is not a readable YAML mapping, naming the file (and line, for bad YAML)."""
    import yaml

    if os.path.isdir(path):
        raise ValueError(f"--config {path!r} is a folder; expected a YAML recipe file")
    try:
        with open(path, encoding="utf-8") as handle:
            recipe = yaml.safe_load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path!r}: no such file; expected a YAML recipe") from None
    except OSError as error:
        raise OSError(f"--config {path!r} cannot be read ({error.strerror or error})") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"{path}{where}: not valid YAML ({problem})") from None
    if recipe is not None and not isinstance(recipe, dict):
        raise ValueError(f"{path}: expected a YAML mapping of option: value, got {type(recipe).__name__}")


def parse_with_recipe(parser: Any, argv: list[str] | None) -> tuple[Any, ...]:
    """`TrlParser.parse_args_and_config` with a checked recipe: a bad file or an unknown key is one line naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = _recipe_path(argv)
    if recipe is not None:
        _check_recipe(recipe)
    try:
        return parser.parse_args_and_config(argv)
    except ValueError as error:
        unknown = re.search(r"Unknown arguments from config file: \[(.*?)\]", str(error))
        if unknown is None:
            raise
        keys = [key.strip("'\" -") for key in unknown.group(1).split(",") if key.strip().startswith("'--")]
        raise ValueError(
            f"{recipe}: unknown option(s) {', '.join(keys)}; see {parser.prog} --help for the options"
        ) from None
