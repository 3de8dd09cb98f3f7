"""Fetch the original DELIA paper's data files and check that they are the expected bytes.

This project does not redistribute the original DELIA data: the training and evaluation sets, the self-sampled
cache and the query cache stay in the authors' repository (github.com/LinesHogan/DELIA). This script downloads
them on your side, from that repository pinned at one commit, and checks every file against a digest recorded
here, so a reproduction starts from exactly the bytes the reference checkpoint was trained on.

    python reproduce_checkpoint/fetch_original.py        # all four files, into reproduce_checkpoint/original/
    python reproduce_checkpoint/fetch_original.py --only train_dataset.jsonl eval_dataset.jsonl
    python reproduce_checkpoint/fetch_original.py --dest /data/delia --force
    python reproduce_checkpoint/fetch_original.py --base-url file:///path/to/a/DELIA/checkout

How a file is fetched: it is streamed into a temporary file in the destination folder, its size (where known)
and digest are checked, and only then is it moved into place with os.replace. A short, corrupted or otherwise
wrong download is deleted and never replaces a file already there. A file already present that verifies is
skipped (--force fetches it again). Network errors are retried a few times with a short backoff; a checksum
mismatch is not retried, it is reported (file, expected and actual digest) and the exit status is non-zero.

Two kinds of digest are recorded: "sha256" (of the file's bytes) and "git-blob", the id git gives the file's
content, sha1(b"blob <size>\\0" + content), which is what `git hash-object FILE` prints.

Standard library only. Tests pass their own table of files: main(argv, files=...), see tests/test_fetch_original.py.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# -----------------------------------------------------------------------------
# what to fetch, from where

REPOSITORY = "LinesHogan/DELIA"
COMMIT = "6506f964439519d06bd643817dcc07d84881348d"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{REPOSITORY}/{COMMIT}"
DEFAULT_DEST = Path(__file__).resolve().parent / "original"

ATTEMPTS = 3  # tries per file on network errors
BACKOFF_S = 1.0  # wait before the second try; doubled before each further one
TIMEOUT_S = 60.0  # per connection / read
CHUNK_BYTES = 1 << 16


@dataclass(frozen=True)
class RemoteFile:
    """One file of the repository: its repo-relative path and the digest (and size, where known) it must have."""

    path: str
    kind: str  # "sha256" or "git-blob"
    digest: str  # lowercase hex
    size: int | None = None  # bytes; None where not recorded

    @property
    def name(self) -> str:
        """The file name it is stored under in the destination folder."""
        return self.path.rsplit("/", 1)[-1]


FILES: tuple[RemoteFile, ...] = (
    RemoteFile(
        "reproduce_checkpoint/train_dataset.jsonl",
        "sha256",
        "fc2af99a272383c4b03482c88a9269f8c7a9496a13344c82b79d4e3bcc6aa105",
        128_445,
    ),
    RemoteFile(
        "reproduce_checkpoint/eval_dataset.jsonl",
        "sha256",
        "ee078f21d23589431d57c3f214c352762a24b660578a409ce85a01d3d9526ede",
        12_404,
    ),
    RemoteFile("reproduce_checkpoint/self_sample_cache.jsonl", "git-blob", "b457b2d6ac9bed1ca0b8ce6c46dee7f59cac2074"),
    RemoteFile("reproduce_self_sample/query_cache.jsonl", "git-blob", "e305dd75abd176b804444a61f97c032a7884c6d8"),
)


class FetchError(Exception):
    """A file could not be fetched or did not verify; the message names the file (or URL) and the reason."""


# -----------------------------------------------------------------------------
# verifying


def file_digest(path: Path, kind: str) -> str:
    """The hex digest of a file: sha256 of its bytes, or its git blob id (sha1 of a "blob <size>\\0" header + bytes)."""
    if kind == "sha256":
        hasher = hashlib.sha256()
    elif kind == "git-blob":
        hasher = hashlib.sha1()
        hasher.update(b"blob %d\0" % path.stat().st_size)
    else:
        raise ValueError(f"unknown digest kind {kind!r} (expected 'sha256' or 'git-blob')")
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            hasher.update(chunk)
    return hasher.hexdigest()


def problem_with(path: Path, entry: RemoteFile) -> str | None:
    """Why the file at path is not the expected one, or None when it verifies."""
    if entry.size is not None:
        size = path.stat().st_size
        if size != entry.size:
            return f"size mismatch: expected {entry.size:,} bytes, got {size:,}"
    actual = file_digest(path, entry.kind)
    if actual != entry.digest.lower():
        return f"checksum mismatch ({entry.kind}): expected {entry.digest.lower()}, got {actual}"
    return None


# -----------------------------------------------------------------------------
# downloading


def download(url: str, folder: Path, name: str) -> Path:
    """Stream url into a new temporary file in folder and return its path (the caller moves or deletes it)."""
    part = folder / f".{name}.{uuid.uuid4().hex[:8]}.part"
    try:
        # a fresh opener per call, so the proxy settings in the environment are read now
        with urllib.request.build_opener().open(url, timeout=TIMEOUT_S) as response, open(part, "xb") as out:
            announced = response.headers.get("Content-Length")
            received = 0
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                received += len(chunk)
            out.flush()
            os.fsync(out.fileno())
        # http.client returns a short body without complaint when the connection drops early
        if announced is not None and received != int(announced):
            raise ConnectionError(f"connection closed after {received:,} of {int(announced):,} bytes")
    except BaseException:
        part.unlink(missing_ok=True)
        raise
    return part


def describe(error: BaseException) -> str:
    """A short one-line account of a network error."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def download_with_retries(url: str, folder: Path, name: str) -> Path:
    """download(), tried ATTEMPTS times on network and server errors (5xx, 429); other HTTP errors fail at once."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return download(url, folder, name)
        except urllib.error.HTTPError as e:
            e.close()
            if e.code < 500 and e.code != 429:
                raise FetchError(f"could not download {url}: {describe(e)}") from None
            error: BaseException = e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as e:
            error = e
        if attempt < ATTEMPTS:
            delay = BACKOFF_S * 2 ** (attempt - 1)
            print(f"  {url}: {describe(error)}; retrying in {delay:g} s", file=sys.stderr)
            time.sleep(delay)
    raise FetchError(f"could not download {url} after {ATTEMPTS} attempts: {describe(error)}")


# -----------------------------------------------------------------------------
# fetching one file


def fetch(entry: RemoteFile, dest: Path, base_url: str = DEFAULT_BASE_URL, force: bool = False) -> str:
    """Make dest/<entry.name> the verified file; return "skipped" (already there and valid) or "fetched".

    Raises FetchError when the download fails or does not verify; the file already at the target is then untouched.
    """
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / entry.name
    if target.exists() and not force:
        problem = problem_with(target, entry)
        if problem is None:
            return "skipped"
        print(f"  {target}: {problem}; downloading it again", file=sys.stderr)

    url = f"{base_url.rstrip('/')}/{entry.path}"
    part = download_with_retries(url, dest, entry.name)
    try:
        problem = problem_with(part, entry)
        if problem is not None:
            raise FetchError(f"{entry.path}: {problem} (downloaded from {url}; discarded, {target} left as it was)")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)
    return "fetched"


# -----------------------------------------------------------------------------
# command line


def parse_args(argv: Sequence[str] | None, files: Sequence[RemoteFile]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=f"Download the original DELIA data files ({REPOSITORY} at {COMMIT[:12]}) and verify them."
    )
    parser.add_argument(
        "--dest", type=Path, default=DEFAULT_DEST, help="folder to put the files in (default: %(default)s)"
    )
    parser.add_argument(
        "--base-url",
        default=DEFAULT_BASE_URL,
        help="URL the repo-relative paths are appended to (default: %(default)s)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        metavar="NAME",
        choices=[entry.name for entry in files] + [entry.path for entry in files],
        help="fetch only these files (file name or repo path): " + ", ".join(entry.name for entry in files),
    )
    parser.add_argument("--force", action="store_true", help="download again even files that already verify")
    args = parser.parse_args(argv)
    if not args.base_url.startswith(("https://", "http://", "file://")):
        parser.error(f"--base-url {args.base_url!r}: expected an https://, http:// or file:// URL")
    return args


def main(argv: Sequence[str] | None = None, files: Sequence[RemoteFile] = FILES) -> int:
    """Fetch and verify the files (all, or those named by --only); 0 when every one is in place, else 1."""
    args = parse_args(argv, files)
    selected = [entry for entry in files if not args.only or entry.name in args.only or entry.path in args.only]

    failures = 0
    for entry in selected:
        try:
            outcome = fetch(entry, args.dest, args.base_url, args.force)
        except (FetchError, OSError) as e:
            print(f"error: {e}" if isinstance(e, FetchError) else f"error: {entry.path}: {e}", file=sys.stderr)
            failures += 1
            continue
        note = "already present and verified" if outcome == "skipped" else "downloaded and verified"
        print(f"{entry.name}: {note} ({entry.kind} {entry.digest[:12]}...)")

    print(f"{len(selected) - failures} of {len(selected)} files in place in {args.dest}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
