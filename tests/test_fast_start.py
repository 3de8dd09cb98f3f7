"""A fast start: every light command answers `--help` and a mistyped option before torch, transformers or trl load,
and `DataclassParser` reads options as transformers' `HfArgumentParser` does (checked side by side)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from delia.command_line import DataclassParser, one_line_errors

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl")
#: Each command that must start light, with a first argument that keeps argparse past its positionals.
LIGHT_COMMANDS = {
    "demo": [],
    "build-cache": ["model", "queries.jsonl", "cache.jsonl"],
    "eval": ["runs/x"],
    "probe": ["model"],
    "plot": ["runs/x"],
    "fetch-model": ["smollm2-135m-instruct"],
}
#: What a fresh interpreter runs: the `delia` command on argv, then prints the exit status and the heavy modules loaded.
SCRIPT = """
import json, sys
from delia.cli import main
try:
    status = main(json.loads(sys.argv[1]))
except SystemExit as exit:
    status = exit.code
heavy = sorted({name.split(".")[0] for name in sys.modules} & set(json.loads(sys.argv[2])))
print(json.dumps({"status": status, "heavy": heavy}))
"""


def run_delia(argv: list[str]) -> tuple[dict, str, str]:
    """`delia argv` in a fresh interpreter: (its status and the heavy modules it imported, stdout before, stderr)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(argv), json.dumps(HEAVY)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    *printed, last = result.stdout.rstrip("\n").split("\n")
    return json.loads(last), "\n".join(printed), result.stderr


@pytest.mark.parametrize("command", sorted(LIGHT_COMMANDS))
def test_help_loads_no_torch_transformers_or_trl(command):
    outcome, printed, stderr = run_delia([command, "--help"])
    assert outcome == {"status": 0, "heavy": []}, (outcome, stderr)
    assert printed.startswith(f"usage: delia {command}") and stderr == ""


@pytest.mark.parametrize("command", sorted(LIGHT_COMMANDS))
def test_a_mistyped_option_is_one_line_before_torch_transformers_or_trl(command):
    outcome, printed, stderr = run_delia([command, *LIGHT_COMMANDS[command], "--ratoi", "2"])
    assert outcome == {"status": 2, "heavy": []}, (outcome, stderr)
    assert printed == "" and stderr.count("\n") == 1 and "usage:" not in stderr
    assert f"delia {command}: error: unrecognized arguments: --ratoi 2 (see delia {command} --help)" in stderr


def test_a_bad_value_of_a_heavy_command_is_answered_by_its_light_parser():
    outcome, _, stderr = run_delia(["probe", "model", "--batch-size", "many"])
    assert outcome == {"status": 2, "heavy": []}, (outcome, stderr)
    assert "--batch_size" in stderr and "'many'" in stderr and stderr.count("\n") == 1


def test_train_and_sweep_still_report_a_typo_in_one_line():
    """Their `DSFTConfig` is TRL's `SFTConfig`: trl loads before the options are read (documented, not hidden)."""
    outcome, _, stderr = run_delia(
        ["train", "--model_name_or_path", "m", "--train_dataset", "t", "--lerning_rate", "1"]
    )
    assert outcome["status"] == 2 and "trl" in outcome["heavy"]
    assert stderr.strip().splitlines()[-1].startswith("delia train: error:") and "--lerning_rate" in stderr


# ----------------------------------------------------------------------------------------------------------------------
# DataclassParser against HfArgumentParser
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Options:
    name: str = field(default="x", metadata={"help": "a name"})
    count: int = 3
    rate: float | None = None
    flag: bool = False
    switch: bool = field(default=True, metadata={"help": "on unless --no_switch"})
    maybe: bool | None = None
    items: list[str] | None = None
    numbers: list[float] = field(default_factory=lambda: [1.0, 2.0])
    mode: str = field(default="a", metadata={"choices": ["a", "b"]})
    kind: Literal["left", "right"] = "left"
    urls: list[str] | None = field(default=None, metadata={"aliases": ["--url"], "action": "extend"})
    needed_value: int = 0


@dataclass
class Required:
    must: int


ARGVS = [
    [],
    ["--name", "y", "--count", "5", "--rate", "0.5"],
    ["--flag", "--no_switch"],
    ["--flag", "false", "--switch", "no"],
    ["--no-switch", "--maybe", "true"],
    ["--items", "a", "b", "--numbers", "3", "4.5"],
    ["--mode", "b", "--kind", "right"],
    ["--url", "u1", "--urls", "u2", "u3"],
    ["--needed-value", "7", "--needed_value", "8"],
]


@pytest.mark.parametrize("argv", ARGVS, ids=lambda argv: " ".join(argv) or "defaults")
def test_options_read_as_hf_argument_parser_reads_them(argv):
    from transformers import HfArgumentParser

    ours = DataclassParser(Options).parse_args_into_dataclasses(argv)
    theirs = HfArgumentParser(Options).parse_args_into_dataclasses(argv, look_for_args_file=False)
    assert ours == theirs


def test_both_spellings_and_defaults_are_in_the_help():
    text = DataclassParser(Options, prog="p").format_help()
    assert "--needed_value NEEDED_VALUE, --needed-value NEEDED_VALUE" in text
    assert "--no_switch, --no-switch" in text and "(default: x)" in text and "{a,b}" in text


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--count", "many"], "--count: invalid int value: 'many'"),
        (["--mode", "c"], "invalid choice: 'c'"),
        (["--kind", "up"], "invalid choice: 'up'"),
        (["--flag", "perhaps"], "expected yes/no"),
        (["--cuont", "2"], "unrecognized arguments: --cuont 2"),
    ],
)
def test_bad_values_are_one_line(argv, fragment, capsys):
    parser = one_line_errors(DataclassParser(Options, prog="delia x"))
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_into_dataclasses(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and error.count("\n") == 1 and fragment in error, error
    assert error.endswith("(see delia x --help)\n")


def test_a_field_without_default_is_required_and_extra_options_come_back_as_a_namespace(capsys):
    parser = one_line_errors(DataclassParser([Options, Required], prog="delia x"))
    parser.add_argument("target")
    options, required, extra = parser.parse_args_into_dataclasses(["t", "--must", "4"])
    assert options == Options() and required == Required(4) and extra.target == "t"
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["t"])
    assert "--must" in capsys.readouterr().err


def test_the_commands_dataclasses_read_as_before():
    """Every light command's options dataclass: our parser and HfArgumentParser agree on the defaults."""
    from transformers import HfArgumentParser

    from delia.build_cache_config import BuildCacheArguments
    from delia.demo import DemoArguments
    from delia.evaluation.eval_config import EvalArguments
    from delia.evaluation.plots import PlotArguments
    from delia.evaluation.probe_config import ProbeArguments
    from delia.models import FetchModelArguments

    for kind in (BuildCacheArguments, DemoArguments, EvalArguments, PlotArguments, ProbeArguments, FetchModelArguments):
        argv = ["--base-url", "http://a", "--base_urls", "http://b"] if kind is BuildCacheArguments else []
        ours = DataclassParser(kind).parse_args_into_dataclasses(argv)
        theirs = HfArgumentParser(kind).parse_args_into_dataclasses(argv, look_for_args_file=False)
        assert [dataclasses.asdict(o) for o in ours] == [dataclasses.asdict(t) for t in theirs], kind.__name__


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_a_missing_recipe_is_one_line_before_trl(command, tmp_path):
    outcome, printed, stderr = run_delia([command, "--config", str(tmp_path / "recipe.yaml")])
    assert outcome == {"status": 2, "heavy": []}, (outcome, stderr)
    assert (
        stderr
        == f"delia {command}: error: --config {str(tmp_path / 'recipe.yaml')!r}: no such file; expected a YAML recipe\n"
    )
