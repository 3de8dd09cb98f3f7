"""The wheel a user builds (`python -m build --wheel`, README's install from a wheel) holds the bundled data and runs.

delia is not on PyPI yet, so a wheel built from the checkout is one of the two documented ways in. The wheel is built
from a copy of the checkout (the build writes build/ and *.egg-info/ next to its sources), installed without
dependencies into a fresh virtual environment that sees this environment's packages (torch and the rest), and
`python -m delia.cli demo` runs there, from a folder outside any checkout, with PYTHONPATH unset: the package it
imports is the installed wheel, not the checkout.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# What a build needs from the checkout; the rest (tests, benchmarks, runs/, .git) stays out of the copy
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "delia")
SKIPPED = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build", "dist")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("build") is None, reason='needs the build package (pip install -e ".[test]")'
)


def clean_env() -> dict[str, str]:
    """This environment without anything that would point Python at the checkout."""
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    return env


def run(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `python -m build --wheel` makes of a copy of the checkout."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=SKIPPED)
        else:
            shutil.copy2(ROOT / name, source / name)
    # --no-isolation: this environment's setuptools (the test extra), no download of a build environment
    run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(work / "dist"), str(source)],
        work,
        300,
    )
    (built,) = (work / "dist").glob("delia_trl-*.whl")
    return built


def test_the_wheel_holds_the_bundled_data(wheel):
    bundled = sorted((ROOT / "delia" / "demo_data").glob("*.jsonl"))
    assert bundled, "no bundled data in the checkout"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path in bundled:
            member = f"delia/demo_data/{path.name}"
            assert member in names, f"{member} is missing from {wheel.name}"
            assert archive.read(member) == path.read_bytes(), f"{member} differs from the checkout's"
        assert "delia/cli.py" in names and "delia/evaluation/evaluate.py" in names
        entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
        assert "delia = delia.cli:main" in archive.read(entry_points).decode()


def test_the_installed_wheel_runs_the_demo_outside_the_checkout(wheel, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], tmp_path, 180)
    python = venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # --ignore-installed: this environment's own delia-trl (an editable install, say) must not count as installed
    pip = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-index", "--ignore-installed"]
    run([*pip, str(wheel)], tmp_path, 180)

    outside = tmp_path / "elsewhere"  # no checkout here or above: tmp_path is outside the repository
    outside.mkdir()
    where = run([str(python), "-c", "import delia; print(delia.__file__)"], outside, 120).stdout.strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), f"imported {where}, not the installed wheel"

    output = tmp_path / "demo"
    run([str(python), "-m", "delia.cli", "demo", "--steps", "2", "--output", str(output)], outside, 300)
    for name in ("log_history.json", "summary.json", "diverse_cache.jsonl", "loss.png"):
        assert (output / name).is_file(), f"the installed demo wrote no {name}"
