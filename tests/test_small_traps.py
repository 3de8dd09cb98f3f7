"""The small traps of a first hour: a mistyped data path never waits for the hub, `max_seq_length` still works (with
one warning), and `delia.enable_logging()` shows delia's own log lines in a plain script."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import downstream_rows, one_line, write_jsonl

import delia
from delia.cli import main
from delia.data import reading
from delia.data.reading import read_dataset
from delia.io import looks_like_local_path

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hub_calls(monkeypatch) -> list[str]:
    """Every hub dataset name `read_dataset` asks `datasets.load_dataset` for (none is loaded: the hub is refused)."""
    calls: list[str] = []

    def load_dataset(name, *args, **kwargs):
        calls.append(name)
        raise ConnectionError("offline")

    monkeypatch.setattr(reading, "load_dataset", load_dataset)
    return calls


@pytest.fixture
def in_a_project(tmp_path, monkeypatch) -> Path:
    """A working folder with a `runs/` folder, as after a first `delia demo`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    return tmp_path


@pytest.mark.parametrize("name", ["runs/x.jsonl", "runs/dmeo", "a/b/c", "./x", "/nowhere/at/all", "~/no-such-cache"])
def test_a_path_like_dataset_name_that_does_not_exist_fails_at_once(name, in_a_project, hub_calls):
    assert looks_like_local_path(os.path.expanduser(name)) or name.endswith(".jsonl")
    with pytest.raises(FileNotFoundError, match="no such file or folder") as error:
        read_dataset(name, "train dataset")
    assert hub_calls == [] and f"train dataset {name!r}" in str(error.value)


def test_a_hub_name_still_goes_to_the_hub(in_a_project, hub_calls):
    """`org/name` whose `org` is no folder here is a hub name: the hub is asked (and its failure named)."""
    with pytest.raises(FileNotFoundError, match="could not be reached"):
        read_dataset("some-org/some-set", "train dataset")
    assert hub_calls == ["some-org/some-set"]


@pytest.mark.parametrize("option", ["--train_dataset", "--general_queries", "--exclude_cache", "--eval_dataset"])
def test_eval_names_a_missing_data_path_at_once(option, tiny_model_dir, in_a_project, hub_calls, capsys):
    argv = ["eval", str(tiny_model_dir), "--output", str(in_a_project / "report"), option, "runs/nope"]
    assert main(argv) == 2
    one_line(capsys, "'runs/nope'", "no such file or folder")
    assert hub_calls == []


def test_probe_build_cache_and_plot_name_a_missing_path_at_once(tiny_model_dir, in_a_project, hub_calls, capsys):
    assert main(["probe", str(tiny_model_dir), "--prompts", "runs/prompts", "--output", "runs/probe"]) == 2
    one_line(capsys, "'runs/prompts'", "no such file or folder")
    assert main(["build-cache", str(tiny_model_dir), "runs/queries", "runs/cache.jsonl"]) == 2
    one_line(capsys, "'runs/queries'", "no such file or folder")
    assert main(["plot", "runs/dmeo"]) == 2
    one_line(capsys, "runs/dmeo", "no such folder")
    assert hub_calls == []


def test_training_data_paths_fail_at_once(in_a_project, hub_calls):
    from delia.data import prepare_datasets

    rows = write_jsonl(in_a_project / "runs" / "rows.jsonl", downstream_rows(4))
    for train, diverse, eval_set, named in (
        ("runs/trian", None, None, "runs/trian"),
        (str(rows), "runs/cahce", None, "runs/cahce"),
        (str(rows), None, "runs/evl", "runs/evl"),
    ):
        with pytest.raises(FileNotFoundError, match="no such file or folder") as error:
            prepare_datasets(train, diverse, eval_set, ratio=1.0)
        assert repr(named) in str(error.value)
    assert hub_calls == []


# ----------------------------------------------------------------------------------------------------------------------
# max_seq_length
# ----------------------------------------------------------------------------------------------------------------------


def test_max_seq_length_is_a_deprecated_alias_of_max_length(tmp_path):
    from delia import DSFTConfig

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        config = DSFTConfig(output_dir=str(tmp_path), max_seq_length=512)
    ours = [w for w in caught if "max_seq_length" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is FutureWarning
    assert ours[0].filename == __file__  # the warning points at the caller's line
    assert config.max_length == 512 and config.max_seq_length is None
    assert DSFTConfig(output_dir=str(tmp_path), max_length=256, max_seq_length=256).max_length == 256
    with pytest.raises(ValueError, match="max_seq_length=512 and max_length=256 disagree"):
        DSFTConfig(output_dir=str(tmp_path), max_length=256, max_seq_length=512)


def test_max_seq_length_on_the_command_line(tmp_path):
    from trl import TrlParser

    from delia import DSFTConfig

    with pytest.warns(FutureWarning, match="max_seq_length is deprecated"):
        (config,) = TrlParser(DSFTConfig).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), "--max_seq_length", "300"]
        )
    assert config.max_length == 300


# ----------------------------------------------------------------------------------------------------------------------
# enable_logging
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def delia_logger():
    """The `delia` logger, restored afterwards (handlers and level)."""
    logger = logging.getLogger("delia")
    handlers, level = list(logger.handlers), logger.level
    yield logger
    logger.handlers[:] = handlers
    logger.setLevel(level)


def test_enable_logging_adds_one_handler_and_sets_the_level(delia_logger):
    stream = io.StringIO()
    handler = delia.enable_logging(stream=stream)
    assert delia.enable_logging("warning") is handler and delia_logger.level == logging.WARNING
    assert sum(h is handler for h in delia_logger.handlers) == 1
    logging.getLogger("delia.data.mixing").info("hidden at WARNING")
    delia.enable_logging(logging.DEBUG)
    logging.getLogger("delia.data.mixing").info("shown at DEBUG")
    assert stream.getvalue() == "delia: shown at DEBUG\n"


def test_a_plain_script_shows_delias_lines_once_logging_is_enabled(tiny_model_dir):
    """In a fresh interpreter: a line logged before `enable_logging()` is not shown, one logged after it is."""
    load = f"delia.setup_tokenizer_and_model({str(tiny_model_dir)!r}, quantization=None, new_tokens=[{{!r}}])\n"
    script = "import delia\n" + load.format("<before>") + "delia.enable_logging()\n" + load.format("<after>")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert "<before>" not in result.stderr
    assert "delia: New tokens ['<after>'] have ids" in result.stderr
