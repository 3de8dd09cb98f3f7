"""The package surface: a cheap `import delia` and `delia --help`, every public name, both DSFTTrainer import paths,
the version, and `delia demo` telling bad input from a failure during training."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import delia
from delia.cli import main

ROOT = Path(__file__).parents[1]
HEAVY = ("torch", "transformers", "trl", "peft", "datasets", "accelerate")


def run_python(*args: str, extra_path: str | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """A fresh interpreter that imports this checkout's `delia` (so nothing is imported yet)."""
    path = os.pathsep.join(p for p in (extra_path, str(ROOT)) if p)  # extra first: ROOT may hold an egg-info
    env = {**os.environ, "PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_import_delia_pulls_in_no_heavy_library():
    code = (
        "import sys, delia\n"
        f"assert delia.__file__.startswith({str(ROOT)!r}), delia.__file__\n"
        f"print(sorted(name for name in sys.modules if name.split('.')[0] in {HEAVY!r}))"
    )
    assert run_python("-c", code).stdout.strip() == "[]"


def test_delia_help_prints_the_commands_and_pulls_in_no_heavy_library():
    result = run_python("-X", "importtime", "-m", "delia.cli", "--help")
    assert "delia demo" in result.stdout and "delia train" in result.stdout and "delia build-cache" in result.stdout
    # -X importtime writes one line per imported module to stderr: "import time: self | cumulative | name"
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "delia" in imported  # `-m` runs delia.cli itself as __main__, after importing the package
    assert not {name for name in imported if name.split(".")[0] in HEAVY}


def test_every_public_name_resolves_to_its_object():
    assert sorted(delia.__all__) == sorted(delia._EXPORTS)
    for name, module in delia._EXPORTS.items():
        value = getattr(delia, name)
        assert value is getattr(importlib.import_module(module), name), name
        assert not isinstance(value, types.ModuleType), name
    namespace: dict = {}
    exec("from delia import *", namespace)
    assert set(delia.__all__) <= set(namespace)
    assert set(delia.__all__) | {"__version__"} <= set(dir(delia))
    from delia import DSFTConfig, DSFTTrainer, build_cache

    assert isinstance(DSFTTrainer, type) and isinstance(DSFTConfig, type) and callable(build_cache)
    with pytest.raises(AttributeError, match="no_such_name"):
        delia.no_such_name  # noqa: B018
    assert isinstance(delia.data, types.ModuleType)  # submodules still resolve as attributes


@pytest.mark.parametrize(
    "first, second",
    [
        ("from delia import DSFTTrainer as package_class", "from delia.DSFTTrainer import DSFTTrainer as legacy_class"),
        ("from delia.DSFTTrainer import DSFTTrainer as legacy_class", "from delia import DSFTTrainer as package_class"),
    ],
)
def test_both_dsfttrainer_import_paths_give_the_class_in_either_order(first, second):
    code = (
        f"{first}\n{second}\n"
        "import sys, delia\n"
        "from delia.trainer import DSFTTrainer\n"
        "assert package_class is legacy_class is DSFTTrainer is delia.DSFTTrainer, (package_class, legacy_class)\n"
        "from delia import DSFTTrainer as again\n"
        "assert again is DSFTTrainer\n"
        "assert sys.modules['delia.DSFTTrainer'].__file__.endswith('DSFTTrainer.py')\n"
        "print('ok')"
    )
    assert run_python("-c", code).stdout.strip() == "ok"


def test_importing_the_build_cache_module_keeps_the_function_exported():
    """`delia.build_cache` is a module and a function; importing the module first must not shadow the function."""
    code = (
        "import types\n"
        "import delia.build_cache\n"
        "from delia.build_cache import main\n"
        "from delia import build_cache\n"
        "assert isinstance(build_cache, types.FunctionType) and build_cache.__module__ == 'delia.build_cache'\n"
        "print('ok')"
    )
    assert run_python("-c", code).stdout.strip() == "ok"


def test_version_comes_from_the_installed_distribution(tmp_path):
    info = tmp_path / "delia_trl-9.8.7.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: delia-trl\nVersion: 9.8.7\n")
    # from tmp_path: `python -c` puts the working directory first, and a checkout holds the installed egg-info
    found = run_python("-c", "import delia; print(delia.__version__)", extra_path=str(tmp_path), cwd=tmp_path)
    assert found.stdout.strip() == "9.8.7"
    missing = run_python("-c", "import delia; delia.DISTRIBUTION = 'delia-trl-not-installed'; print(delia.__version__)")
    assert missing.stdout.strip() == "0.0.0+unknown"


def test_demo_lets_a_training_failure_keep_its_traceback(tmp_path, monkeypatch, capsys):
    """Before, any ValueError or OSError in the whole demo became `exit 2` and one line, hiding real failures."""
    from delia.trainer import DSFTTrainer

    def fail(*args, **kwargs):
        raise ValueError("broke during training")

    monkeypatch.setattr(DSFTTrainer, "train", fail)
    output = tmp_path / "demo"
    with pytest.raises(ValueError, match="broke during training"):
        main(["demo", "--output", str(output), "--steps", "2"])
    assert (output / "diverse_cache.jsonl").exists()  # setup ran to the end; training raised
    assert "delia demo: error" not in capsys.readouterr().err


def test_demo_reports_bad_input_in_one_line(tmp_path, capsys):
    assert main(["demo", "--output", str(tmp_path / "demo"), "--ratio", "-1"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("delia demo: error: ") and "-1" in error and error.count("\n") == 1
