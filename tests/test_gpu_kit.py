"""The GPU kit (benchmarks/gpu/run.py) rehearsed on the CPU: every phase with tiny sizes, and its bad-input lines.

The kit runs on a lent GPU only by chance, so this dry run is what keeps it working between loans.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KIT = ROOT / "benchmarks" / "gpu" / "run.py"
PHASES = ("env", "cuda", "perf", "regime")


def run_kit(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, str(KIT), *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
    )


def test_dry_run_runs_every_phase_and_every_check_passes(tmp_path):
    out = tmp_path / "out"
    result = run_kit("--dry-run", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert list(report["phases"]) == list(PHASES)
    for name, phase in report["phases"].items():
        assert phase["status"] == "done", (name, phase["status"])
        statuses = {check["name"]: check["status"] for check in phase["checks"]}
        assert statuses and all(status in ("pass", "skipped") for status in statuses.values()), (name, statuses)
    skipped = [c["name"] for p in report["phases"].values() for c in p["checks"] if c["status"] == "skipped"]
    assert all(name.startswith(("8bit", "4bit")) for name in skipped), skipped  # only quantization needs CUDA
    assert "peak_bf16_tflops" in report["phases"]["env"]["metrics"]
    assert "dsft_over_sft_step_time" in report["phases"]["perf"]["metrics"]
    assert {"eval base", "eval delia-260-1ep", "eval sft-1ep", "eval sft-3ep"} <= set(
        report["phases"]["regime"]["metrics"]
    )
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert all(f"## {name}: done" in markdown for name in PHASES)


def test_a_second_call_keeps_the_phases_it_does_not_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {
        "meta": {},
        "calls": [],
        "phases": {
            "env": {
                "status": "done",
                "budget_s": 30,
                "seconds": 1.0,
                "checks": [],
                "metrics": {"peak_bf16_tflops": 1.0},
                "cuts": [],
            }
        },
    }
    (out / "report.json").write_text(json.dumps(earlier), encoding="utf-8")
    # a budget too small for any work: the phase is recorded as skipped, the earlier one kept
    result = run_kit("--dry-run", "--phases", "cuda", "--budget", "0.5", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    phases = json.loads((out / "report.json").read_text(encoding="utf-8"))["phases"]
    assert phases["env"]["metrics"] == {"peak_bf16_tflops": 1.0}
    assert phases["cuda"]["status"].startswith("skipped")


def staged_folder(tmp_path: Path, content: bytes | None, recorded: bytes = b"the part's bytes") -> Path:
    """A staged folder whose manifest lists one model part; `content` is what is on disk (None: nothing)."""
    staged = tmp_path / "staged"
    (staged / "model").mkdir(parents=True)
    part = {"file": "part-00", "bytes": len(recorded), "sha256": hashlib.sha256(recorded).hexdigest()}
    manifest = {
        "wheels": [],
        "model": {
            "name": "smollm2-135m-instruct",
            "wheel_file": "x.whl",
            "wheel_sha256": "0",
            "bytes": len(recorded),
            "parts": [part],
        },
    }
    (staged / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    if content is not None:
        (staged / "model" / "part-00").write_bytes(content)
    return staged


def assert_one_line(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert all(word in lines[0] for word in words), lines[0]


def test_unknown_phase_is_one_line(tmp_path):
    assert_one_line(run_kit("--phases", "env,warp", "--out", str(tmp_path)), "unknown phase 'warp'", "regime")


def test_missing_staged_part_is_one_line(tmp_path):
    staged = staged_folder(tmp_path, None)
    result = run_kit("--phases", "regime", "--staged", str(staged), "--out", str(tmp_path / "out"))
    assert_one_line(result, "missing staged model part", "part-00", "stage.py fetch")
    assert not (tmp_path / "out").exists()  # before any work


def test_staged_part_with_a_wrong_checksum_is_one_line(tmp_path):
    staged = staged_folder(tmp_path, b"something else")
    result = run_kit("--phases", "regime", "--staged", str(staged), "--out", str(tmp_path / "out"))
    assert_one_line(result, "does not match its sha256", "part-00")


def test_no_manifest_is_one_line(tmp_path):
    result = run_kit("--phases", "regime", "--staged", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out"))
    assert_one_line(result, "no staged manifest", "stage.py fetch")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is visible: the kit would run")
def test_no_cuda_without_dry_run_is_one_line(tmp_path):
    result = run_kit("--phases", "env", "--out", str(tmp_path / "out"))
    assert_one_line(result, "no CUDA GPU", "--dry-run")
    assert not (tmp_path / "out").exists()
