"""reproduce_checkpoint/fetch_original.py, offline: a fake repository served over file:// and a local HTTP server.

The real digests cannot be matched by test files, so the tests pass their own table of files to main(argv, files=...)
and fetch(entry, ...); one test checks the real table, one runs the script as a command against wrong content.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib.util
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "reproduce_checkpoint" / "fetch_original.py"
_spec = importlib.util.spec_from_file_location("fetch_original", SCRIPT)
fetch_original = importlib.util.module_from_spec(_spec)
sys.modules["fetch_original"] = fetch_original
_spec.loader.exec_module(fetch_original)
RemoteFile = fetch_original.RemoteFile

TRAIN = "reproduce_checkpoint/train_dataset.jsonl"
CACHE = "reproduce_self_sample/query_cache.jsonl"
CONTENT = {
    TRAIN: b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 50,
    CACHE: b'{"messages": [{"role": "user", "content": "sea?"}]}\n' * 20,
}


def sha256_entry(path: str, data: bytes) -> RemoteFile:
    return RemoteFile(path, "sha256", hashlib.sha256(data).hexdigest(), len(data))


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob " + str(len(data)).encode() + b"\0" + data).hexdigest()


def make_repo(root: Path, content: dict[str, bytes]) -> Path:
    for path, data in content.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return root


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".part"))


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch):
    monkeypatch.setattr(fetch_original, "BACKOFF_S", 0.0)


@pytest.fixture
def repo(tmp_path) -> Path:
    return make_repo(tmp_path / "repo", CONTENT)


@pytest.fixture
def dest(tmp_path) -> Path:
    return tmp_path / "original"


@pytest.fixture
def table() -> list[RemoteFile]:
    return [sha256_entry(path, data) for path, data in CONTENT.items()]


class Server:
    """A local HTTP server for a repository folder that records the paths it is asked for and can misbehave."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        self.truncate: dict[str, tuple[int, bool]] = {}  # path -> (bytes to send, announce the full length?)
        self.fail_first: dict[str, int] = {}  # path -> number of 503 answers before serving it
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.lstrip("/")
                server.requests.append(path)
                if server.fail_first.get(path, 0) > 0:
                    server.fail_first[path] -= 1
                    self.send_error(503)
                    return
                file = server.root / path
                if not file.is_file():
                    self.send_error(404)
                    return
                data = file.read_bytes()
                body, announced = data, len(data)
                if path in server.truncate:
                    keep, announce_full = server.truncate[path]
                    body = data[:keep]
                    announced = len(data) if announce_full else keep
                self.send_response(200)
                self.send_header("Content-Length", str(announced))
                self.end_headers()
                self.wfile.write(body)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, path: str) -> int:
        return self.requests.count(path)


@pytest.fixture
def server(repo, monkeypatch) -> Iterator[Server]:
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    served = Server(repo)
    thread = threading.Thread(target=served.httpd.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()
    thread.join()


# -----------------------------------------------------------------------------
# the real table


def test_real_table_is_the_four_original_files():
    assert [(e.path, e.kind, e.digest, e.size) for e in fetch_original.FILES] == [
        (
            "reproduce_checkpoint/train_dataset.jsonl",
            "sha256",
            "fc2af99a272383c4b03482c88a9269f8c7a9496a13344c82b79d4e3bcc6aa105",
            128_445,
        ),
        (
            "reproduce_checkpoint/eval_dataset.jsonl",
            "sha256",
            "ee078f21d23589431d57c3f214c352762a24b660578a409ce85a01d3d9526ede",
            12_404,
        ),
        ("reproduce_checkpoint/self_sample_cache.jsonl", "git-blob", "b457b2d6ac9bed1ca0b8ce6c46dee7f59cac2074", None),
        ("reproduce_self_sample/query_cache.jsonl", "git-blob", "e305dd75abd176b804444a61f97c032a7884c6d8", None),
    ]
    names = [e.name for e in fetch_original.FILES]
    assert names == ["train_dataset.jsonl", "eval_dataset.jsonl", "self_sample_cache.jsonl", "query_cache.jsonl"]
    assert fetch_original.DEFAULT_BASE_URL == (
        "https://raw.githubusercontent.com/LinesHogan/DELIA/6506f964439519d06bd643817dcc07d84881348d"
    )
    assert fetch_original.DEFAULT_DEST == SCRIPT.parent / "original"


def test_command_line_reports_every_mismatch_against_the_real_table(tmp_path):
    real = fetch_original.FILES
    wrong = make_repo(tmp_path / "repo", {e.path: b"not the original\n" for e in real})
    dest = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--dest", str(dest), "--base-url", wrong.as_uri()],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    for entry in real:
        assert entry.path in result.stderr
    assert real[2].digest in result.stderr and git_blob_id(b"not the original\n") in result.stderr
    assert "size mismatch: expected 128,445 bytes, got 17" in result.stderr
    assert sorted(p.name for p in dest.iterdir()) == []  # nothing landed, no temporary files left


# -----------------------------------------------------------------------------
# (1) downloads land and verify


def test_download_over_file_urls(repo, dest, table, capsys):
    assert fetch_original.main(["--dest", str(dest), "--base-url", repo.as_uri()], files=table) == 0
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]
    assert (dest / "query_cache.jsonl").read_bytes() == CONTENT[CACHE]
    assert leftovers(dest) == []
    assert "2 of 2 files in place" in capsys.readouterr().out


def test_download_over_http(server, dest, table):
    assert fetch_original.main(["--dest", str(dest), "--base-url", server.url + "/"], files=table) == 0
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]
    assert (dest / "query_cache.jsonl").read_bytes() == CONTENT[CACHE]
    assert server.requests == [TRAIN, CACHE]
    assert leftovers(dest) == []


def test_only_fetches_the_named_files(server, dest, table):
    argv = ["--dest", str(dest), "--base-url", server.url, "--only", "query_cache.jsonl"]
    assert fetch_original.main(argv, files=table) == 0
    assert server.requests == [CACHE]
    assert sorted(p.name for p in dest.iterdir()) == ["query_cache.jsonl"]
    with pytest.raises(SystemExit) as exit_info:
        fetch_original.main(["--dest", str(dest), "--only", "nope.jsonl"], files=table)
    assert exit_info.value.code == 2


# -----------------------------------------------------------------------------
# (2) a digest mismatch is an error and leaves a good file alone


def test_mismatch_leaves_the_good_file_byte_identical(tmp_path, dest, table, capsys):
    bad = make_repo(tmp_path / "bad", {TRAIN: CONTENT[TRAIN].replace(b"hello", b"HELLO")})
    dest.mkdir()
    (dest / "train_dataset.jsonl").write_bytes(CONTENT[TRAIN])
    argv = ["--dest", str(dest), "--base-url", bad.as_uri(), "--only", TRAIN, "--force"]
    assert fetch_original.main(argv, files=table) == 1
    err = capsys.readouterr().err
    assert TRAIN in err and "checksum mismatch (sha256)" in err
    assert table[0].digest in err and hashlib.sha256(CONTENT[TRAIN].replace(b"hello", b"HELLO")).hexdigest() in err
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]
    assert leftovers(dest) == []

    with pytest.raises(fetch_original.FetchError, match="train_dataset.jsonl.*checksum mismatch"):
        fetch_original.fetch(table[0], dest, bad.as_uri(), force=True)
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]
    assert leftovers(dest) == []


def test_mismatch_with_nothing_there_leaves_nothing(server, dest):
    entry = RemoteFile(TRAIN, "sha256", "0" * 64, len(CONTENT[TRAIN]))
    with pytest.raises(fetch_original.FetchError, match=f"{TRAIN}: checksum mismatch .*expected {'0' * 64}, got"):
        fetch_original.fetch(entry, dest, server.url)
    assert list(dest.iterdir()) == []


# -----------------------------------------------------------------------------
# (3) a valid file is skipped, an invalid one fetched again


def test_valid_file_is_skipped_unless_forced(server, dest, table, capsys):
    dest.mkdir()
    (dest / "train_dataset.jsonl").write_bytes(CONTENT[TRAIN])
    assert fetch_original.main(["--dest", str(dest), "--base-url", server.url], files=table) == 0
    assert server.requests == [CACHE]
    assert "train_dataset.jsonl: already present and verified" in capsys.readouterr().out

    assert fetch_original.main(["--dest", str(dest), "--base-url", server.url, "--force"], files=table) == 0
    assert server.requests == [CACHE, TRAIN, CACHE]


def test_invalid_existing_file_is_replaced(server, dest, table):
    dest.mkdir()
    (dest / "train_dataset.jsonl").write_bytes(b"stale\n")
    assert fetch_original.fetch(table[0], dest, server.url) == "fetched"
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]
    assert server.requests == [TRAIN]


# -----------------------------------------------------------------------------
# (4) git blob ids


def test_git_blob_digest_matches_git(tmp_path):
    empty, data = tmp_path / "empty", tmp_path / "data"
    empty.write_bytes(b"")
    data.write_bytes(CONTENT[CACHE])
    assert fetch_original.file_digest(empty, "git-blob") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"  # git's own
    assert fetch_original.file_digest(data, "git-blob") == git_blob_id(CONTENT[CACHE])
    if shutil.which("git"):
        hashed = subprocess.run(["git", "hash-object", str(data)], capture_output=True, text=True, check=True)
        assert hashed.stdout.strip() == git_blob_id(CONTENT[CACHE])


def test_git_blob_verification(server, dest):
    good = RemoteFile(CACHE, "git-blob", git_blob_id(CONTENT[CACHE]))
    assert fetch_original.fetch(good, dest, server.url) == "fetched"
    assert (dest / "query_cache.jsonl").read_bytes() == CONTENT[CACHE]
    assert fetch_original.fetch(good, dest, server.url) == "skipped"
    assert server.requests == [CACHE]

    sha1_of_bytes = hashlib.sha1(CONTENT[CACHE]).hexdigest()  # a plain sha1 is not the blob id
    wrong = RemoteFile(CACHE, "git-blob", sha1_of_bytes)
    with pytest.raises(fetch_original.FetchError, match=f"expected {sha1_of_bytes}, got {git_blob_id(CONTENT[CACHE])}"):
        fetch_original.fetch(wrong, dest, server.url, force=True)
    assert (dest / "query_cache.jsonl").read_bytes() == CONTENT[CACHE]
    assert leftovers(dest) == []


# -----------------------------------------------------------------------------
# (5) truncated downloads, retries, HTTP errors


@pytest.mark.parametrize("announce_full", [False, True], ids=["short-length", "connection-dropped"])
def test_truncated_download_does_not_replace_the_good_file(server, dest, table, announce_full):
    dest.mkdir()
    (dest / "train_dataset.jsonl").write_bytes(CONTENT[TRAIN])
    server.truncate[TRAIN] = (100, announce_full)
    with pytest.raises(fetch_original.FetchError) as error:
        fetch_original.fetch(table[0], dest, server.url, force=True)
    if announce_full:  # a dropped connection is a network error: retried, then reported with the URL
        assert f"{server.url}/{TRAIN}" in str(error.value) and "after 3 attempts" in str(error.value)
        assert server.count(TRAIN) == 3
    else:  # a short but complete answer fails the size check, which is not retried
        assert f"expected {len(CONTENT[TRAIN]):,} bytes, got 100" in str(error.value)
        assert server.count(TRAIN) == 1
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]
    assert leftovers(dest) == []


def test_server_errors_are_retried(server, dest, table):
    server.fail_first[TRAIN] = 2
    assert fetch_original.fetch(table[0], dest, server.url) == "fetched"
    assert server.count(TRAIN) == 3
    assert (dest / "train_dataset.jsonl").read_bytes() == CONTENT[TRAIN]


def test_missing_file_fails_at_once_naming_the_url(server, dest, capsys):
    entry = RemoteFile("reproduce_checkpoint/missing.jsonl", "sha256", "0" * 64)
    assert fetch_original.main(["--dest", str(dest), "--base-url", server.url], files=[entry]) == 1
    err = capsys.readouterr().err
    assert f"error: could not download {server.url}/reproduce_checkpoint/missing.jsonl: HTTP 404" in err
    assert server.requests == ["reproduce_checkpoint/missing.jsonl"]
    assert list(dest.iterdir()) == []


def test_unreachable_server_is_reported_after_retries(tmp_path, dest, table, capsys):
    missing = (tmp_path / "no-such-repo").as_uri()
    assert fetch_original.main(["--dest", str(dest), "--base-url", missing, "--only", TRAIN], files=table) == 1
    err = capsys.readouterr().err
    assert f"error: could not download {missing}/{TRAIN} after 3 attempts" in err
    assert list(dest.iterdir()) == []


def test_a_base_url_that_is_not_a_url_is_refused(dest, table, capsys):
    with pytest.raises(SystemExit) as exit_info:
        fetch_original.main(["--dest", str(dest), "--base-url", "nonsense"], files=table)
    assert exit_info.value.code == 2 and "--base-url 'nonsense': expected an https://" in capsys.readouterr().err
    assert not dest.exists() or list(dest.iterdir()) == []
