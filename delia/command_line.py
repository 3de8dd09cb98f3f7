"""How every `delia` command reads its options: dataclasses, both option spellings, and one line on a bad value.

Most commands read their dataclasses with `DataclassParser`, a small builder on `argparse` with the semantics of
transformers' `HfArgumentParser`: each field as `--snake_case` and `--kebab-case`; a bool field takes an optional
value (`--x`, `--x false`) and, when it defaults to True, also `--no_x`; `list[X]` takes one or more values;
`X | None` reads as X; `choices`, `aliases` and `action` come from the field's metadata; the help shows defaults.
Why not `HfArgumentParser` itself: importing transformers costs 0.5-0.9 s before a single option is read, and the
commands promise `--help` and a typo answered in well under a second, before torch, transformers or trl load.
`delia train` and `delia sweep` use TRL's `TrlParser` (YAML recipes with `--config`): their `DSFTConfig` is a TRL
`SFTConfig`, so listing their options needs trl and transformers anyway.

argparse answers a bad value with the whole usage text before the error; delia's commands answer with the error
alone, naming the command and pointing at `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import types
from typing import Any, Literal, NoReturn, Union, get_args, get_origin, get_type_hints


def one_line_errors(parser: Any) -> Any:
    """Make `parser` report a bad option or value in one line on stderr (exit status 2), without the usage dump."""

    def error(message: str) -> NoReturn:
        print(f"{parser.prog}: error: {message} (see {parser.prog} --help)", file=sys.stderr)
        raise SystemExit(2)

    parser.error = error
    return parser


def _to_bool(value: str | bool) -> bool:
    """A bool option's value: yes/no, true/false, t/f, y/n, 1/0 (any case), as `HfArgumentParser` reads them."""
    if isinstance(value, bool):
        return value
    if value.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if value.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, true/false, t/f, y/n or 1/0, got {value!r}")


def _field_type(name: str, hint: Any) -> Any:
    """`X | None` (and `X | str`) read as X; any other union is refused, as `HfArgumentParser` refuses it."""
    if get_origin(hint) in (Union, types.UnionType):
        members = [member for member in get_args(hint) if member is not type(None)]
        if bool in members:
            return bool
        if len(members) > 1 and str in members:
            members.remove(str)
        if len(members) != 1:
            raise TypeError(f"option {name!r}: only X | None is read from the command line, got {hint}")
        return members[0]
    return hint


def _add_field(parser: argparse.ArgumentParser, field: dataclasses.Field, hint: Any) -> None:
    """One dataclass field as an option (and its `--no_x` complement for a bool that defaults to True)."""
    options = [f"--{field.name}"] + ([f"--{field.name.replace('_', '-')}"] if "_" in field.name else [])
    settings = dict(field.metadata)
    aliases = settings.pop("aliases", [])
    aliases = [aliases] if isinstance(aliases, str) else list(aliases)
    kind = _field_type(field.name, hint)
    has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if get_origin(kind) is Literal:
        settings["choices"] = list(get_args(kind))
        lookup = {str(choice): choice for choice in settings["choices"]}
        settings["type"] = lambda value: lookup.get(value, value)
    elif kind is bool:
        settings.update(type=_to_bool, nargs="?", const=True)
        default = False if default is dataclasses.MISSING else default
        has_default = True
    elif get_origin(kind) is list or kind is list:
        settings.update(type=(get_args(kind) or (str,))[0], nargs="+")
    else:
        settings["type"] = kind
    if has_default:
        settings["default"] = default
    else:
        settings["required"] = True
    parser.add_argument(*options, *aliases, **settings)
    if kind is bool and default is True:
        complement = {key: value for key, value in field.metadata.items() if key not in ("aliases",)}
        parser.add_argument(
            f"--no_{field.name}",
            f"--no-{field.name.replace('_', '-')}",
            action="store_false",
            dest=field.name,
            **{**complement, "default": False},
        )


class DataclassParser(argparse.ArgumentParser):
    """An `argparse` parser of dataclasses, with `HfArgumentParser`'s option semantics (see the module's docstring)."""

    def __init__(self, dataclass_types: Any, **settings: Any):
        settings.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**settings)
        self.dataclass_types = [dataclass_types] if dataclasses.is_dataclass(dataclass_types) else list(dataclass_types)
        for kind in self.dataclass_types:
            hints = get_type_hints(kind)
            for field in dataclasses.fields(kind):
                if field.init:
                    _add_field(self, field, hints[field.name])

    def parse_args_into_dataclasses(self, args: list[str] | None = None) -> tuple[Any, ...]:
        """One instance per dataclass, then a namespace of the options added by hand (if any).

        An unknown option is a one-line error (exit status 2); a dataclass's own check raises its ValueError.
        """
        namespace = vars(self.parse_args(args))
        outputs = []
        for kind in self.dataclass_types:
            names = {field.name for field in dataclasses.fields(kind) if field.init}
            outputs.append(kind(**{name: namespace.pop(name) for name in names if name in namespace}))
        if namespace:
            outputs.append(argparse.Namespace(**namespace))
        return tuple(outputs)


def command_parser(dataclass_types: Any, prog: str, description: str | None = None, recipes: bool = False) -> Any:
    """The parser of one command: its options dataclasses (both spellings), one-line errors, `--config` if `recipes`.

    Without `recipes` nothing heavy is imported (`DataclassParser`); with it, TRL's `TrlParser` (trl, transformers).
    """
    if recipes:
        from trl import TrlParser

        return one_line_errors(TrlParser(dataclass_types, prog=prog, description=description))
    return one_line_errors(DataclassParser(dataclass_types, prog=prog, description=description))


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


def check_recipe_argument(argv: list[str]) -> None:
    """Raise one line (ValueError / OSError) for a `--config` recipe in `argv` that is missing or not a YAML mapping.

    Needs only yaml, so `delia train` and `delia sweep` (whose options need trl) report a bad recipe before trl loads.
    """
    recipe = _recipe_path(argv)
    if recipe is not None:
        _check_recipe(recipe)


def parse_with_recipe(parser: Any, argv: list[str] | None) -> tuple[Any, ...]:
    """`TrlParser.parse_args_and_config` with a checked recipe: a bad file or an unknown key is one line naming it."""
    argv = sys.argv[1:] if argv is None else list(argv)
    recipe = _recipe_path(argv)
    check_recipe_argument(argv)
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
