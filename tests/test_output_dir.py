"""An output folder that cannot be written: one line before any training, nothing half-written.

Root ignores file permissions, and these tests run as root on our machines, so the read-only case uses a real
read-only file system: a bind mount remounted read-only inside `unshare -rm` (a user and mount namespace, no root
needed where user namespaces are allowed); it is skipped where that is not possible. The permission case runs only
as a normal user (as in CI). A full disk cannot be made without root; the nearest real thing is a file size limit
(RLIMIT_FSIZE), under which a write fails part-way with EFBIG exactly where a full disk fails with ENOSPC.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import downstream_rows, write_jsonl

from delia.cli import main
from delia.io import write_json_atomically

REPOSITORY = Path(__file__).parents[1]


def read_only_mount_command(folder: Path, script: str) -> list[str]:
    """Run `python -c script` with `folder` remounted read-only in a private mount namespace."""
    mount = f"mount --bind '{folder}' '{folder}' && mount -o remount,bind,ro '{folder}' '{folder}'"
    return ["unshare", "-rm", "sh", "-c", f'{mount} && exec "$0" -c "$1"', sys.executable, script]


def test_train_into_a_read_only_file_system_fails_in_one_line_before_training(tmp_path):
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare (util-linux) for a read-only bind mount")
    probe = subprocess.run(read_only_mount_command(outputs, f"open({str(outputs / 'x')!r}, 'w')"), capture_output=True)
    if b"Read-only file system" not in probe.stderr:
        pytest.skip(f"cannot make a read-only bind mount here: {probe.stderr.decode()[-300:]}")

    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(4))
    script = (
        "from delia.cli import main\n"
        f"for output in ({str(outputs)!r}, {str(outputs / 'run')!r}):\n"
        f"    print(main(['train', '--model_name_or_path', 'unused', '--train_dataset', {str(train)!r},"
        " '--output_dir', output]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run(read_only_mount_command(outputs, script), env=env, capture_output=True, text=True)
    assert result.stdout.split() == ["2", "2"], result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("delia train:")]
    assert errors == [
        f"delia train: error: output folder {str(outputs)!r} cannot be written (Read-only file system); choose "
        "another folder",
        f"delia train: error: output folder {str(outputs / 'run')!r} cannot be written (Read-only file system); "
        "choose another folder",
    ]
    assert "Traceback" not in result.stderr
    assert list(outputs.iterdir()) == []  # the model 'unused' was never loaded: the check comes first


def test_train_under_a_file_or_without_permission_fails_in_one_line(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", downstream_rows(4))
    options = ["train", "--model_name_or_path", "unused", "--train_dataset", str(train), "--output_dir"]
    under_a_file = tmp_path / "notes.txt" / "run"
    (tmp_path / "notes.txt").write_text("mine")
    assert main([*options, str(under_a_file)]) == 2
    assert capsys.readouterr().err == (
        f"delia train: error: output folder {str(under_a_file)!r} cannot be written (Not a directory); choose "
        "another folder\n"
    )
    assert (tmp_path / "notes.txt").read_text() == "mine"
    if os.geteuid() == 0:
        return  # root writes whatever the permissions say: the read-only case above covers root
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    assert main([*options, str(locked)]) == 2
    assert "cannot be written (Permission denied)" in capsys.readouterr().err and list(locked.iterdir()) == []


def test_a_failed_write_leaves_the_old_record_and_no_temporary_file(tmp_path, monkeypatch):
    record = tmp_path / "delia_mixture.json"
    write_json_atomically(str(record), {"rows": 1})
    before = record.read_bytes()

    def dump_half_then_fail(payload, out, **options):
        out.write('{"rows": ')
        raise TypeError("Object of type set is not JSON serializable")

    monkeypatch.setattr(json, "dump", dump_half_then_fail)
    with pytest.raises(TypeError):
        write_json_atomically(str(record), {"rows": {2}})
    monkeypatch.undo()
    assert record.read_bytes() == before and sorted(path.name for path in tmp_path.iterdir()) == [record.name]

    # the disk fills up part-way through the write (a file size limit: EFBIG where a full disk gives ENOSPC)
    script = (
        "import errno, resource, signal, sys\nfrom delia.io import write_json_atomically\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))\n"
        "try:\n"
        f"    write_json_atomically({str(record)!r}, {{'rows': ['x' * 100] * 1000}})\n"
        "except OSError as error:\n"
        "    print(errno.errorcode[error.errno])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "EFBIG", result.stderr[-2000:]
    assert record.read_bytes() == before and sorted(path.name for path in tmp_path.iterdir()) == [record.name]


def test_atomic_writes_keep_a_files_permissions_and_give_new_files_the_umasks(tmp_path):
    from delia.io import replace_atomically
    from delia.sweep import plot_metrics

    old_umask = os.umask(0o022)
    try:
        fresh = tmp_path / "fresh.txt"
        replace_atomically(fresh, lambda out: out.write("a\n"))
        assert fresh.read_text() == "a\n" and fresh.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        kept = tmp_path / "kept.txt"
        kept.write_text("old\n")
        kept.chmod(0o640)
        replace_atomically(kept, lambda out: out.write(b"new\n"), binary=True)
        assert kept.read_text() == "new\n" and kept.stat().st_mode & 0o777 == 0o640
        rows = [{"run": "ratio-0", "parse_rate_mean": 0.5, "parse_rate_std": None}]
        (path,) = plot_metrics(rows, str(tmp_path), file_format="svg", metrics=["parse_rate"])
        assert (
            open(path, encoding="utf-8").read().lstrip().startswith("<?xml") and os.stat(path).st_mode & 0o777 == 0o644
        )
        assert sorted(name for name in os.listdir(tmp_path) if name.startswith(".")) == []  # no temporary left
    finally:
        os.umask(old_umask)
