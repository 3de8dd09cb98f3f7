"""Files that survive a kill: atomic replace, durable JSONL append, JSONL reading with file:line errors; and whether
a name that does not exist was meant as a local path (`looks_like_local_path`), so it fails at once, not after the hub.

Every module that writes a run's files uses these, so the guarantees hold in one place: a replaced file is the old one
or the new one, never half; an appended line is on disk when the call returns, and a partial last line left by a
killed process is moved to `<file>.partial` (kept, not deleted) before the next append.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Callable, Iterator, Mapping
from typing import Any


def _create_temporary(path: str) -> tuple[int, str]:
    """A new, uniquely named file next to `path`, created with the umask's permissions (`mkstemp` forces 0600)."""
    folder, name = os.path.split(os.path.abspath(path))
    while True:
        temporary = os.path.join(folder, f".{name}-{secrets.token_hex(6)}")
        try:
            return os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temporary
        except FileExistsError:
            continue


def replace_atomically(path: str | os.PathLike, write: Callable[[Any], Any], binary: bool = False) -> None:
    """Write a temporary file next to `path` with `write`, flush and fsync it, then move it over `path`.

    If writing fails, the temporary file is removed and `path` is left as it was. The file keeps the old file's
    permissions; a new one gets what `open()` would give it. `binary` hands `write` a bytes handle.
    """
    path = os.fspath(path)
    handle, temporary = _create_temporary(path)
    try:
        with os.fdopen(handle, "wb") if binary else os.fdopen(handle, "w", encoding="utf-8") as out:
            with contextlib.suppress(FileNotFoundError):  # an existing file keeps its permissions
                os.fchmod(out.fileno(), os.stat(path).st_mode & 0o7777)
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def write_json_atomically(path: str | os.PathLike, payload: Any) -> None:
    """Write `payload` as indented JSON to `path` in one step: a kill leaves the old file or the new one, never half."""
    replace_atomically(path, lambda out: out.write(json.dumps(payload, indent=2) + "\n"))


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` in one step (see `replace_atomically`)."""
    replace_atomically(path, lambda out: out.write(text))


def read_json_or_none(path: str | os.PathLike) -> Any:
    """The JSON value in `path`, or None when the file is missing, unreadable or not JSON (an optional record)."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError):
        return None


def read_json(path: str | os.PathLike, expected: str) -> Any:
    """The JSON value in `path`; a missing file or bad JSON is a ValueError naming the file and `expected`."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"{os.fspath(path)!r} not found; expected {expected}") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{os.fspath(path)}: not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            f"expected {expected}"
        ) from None
    except UnicodeDecodeError:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text; expected {expected}") from None


def _last_newline(handle, size: int) -> int:
    """Offset of the last b"\\n" in the file, or -1."""
    position, chunk = size, 1 << 16
    while position > 0:
        start = max(0, position - chunk)
        handle.seek(start)
        found = handle.read(position - start).rfind(b"\n")
        if found >= 0:
            return start + found
        position = start
    return -1


def repair_tail(path: str | os.PathLike) -> str | None:
    """Make `path` end with a complete line; return where a partial last line was saved, if there was one.

    A tail that is in fact a complete JSON object lacking only its newline gets the newline instead.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return None
    with open(path, "rb+") as handle:
        size = handle.seek(0, os.SEEK_END)
        if size == 0:
            return None
        handle.seek(size - 1)
        if handle.read(1) == b"\n":
            return None
        cut = _last_newline(handle, size) + 1
        handle.seek(cut)
        tail = handle.read()
        try:
            complete = isinstance(json.loads(tail), dict)
        except ValueError:
            complete = False
        if complete:
            handle.seek(size)
            handle.write(b"\n")
            return None
        saved = f"{path}.partial"
        with open(saved, "ab") as partial:
            partial.write(tail + b"\n")
            partial.flush()
            os.fsync(partial.fileno())
        handle.truncate(cut)
        handle.flush()
        os.fsync(handle.fileno())
        return saved


def append_jsonl(path: str | os.PathLike, records: list[Mapping[str, Any]] | Mapping[str, Any]) -> int:
    """Append one record (or several) as JSON lines in a single write, flushed and fsynced; return the lines written.

    Earlier lines are never touched; a partial last line left by a killed run is first moved aside.
    """
    rows = [records] if isinstance(records, Mapping) else records
    text = "".join(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n" for row in rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    repair_tail(path)
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return len(rows)


def iter_jsonl(path: str | os.PathLike, skip_partial_tail: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of a JSONL file; a bad line is a ValueError naming file and line.

    `skip_partial_tail` passes over a last line without its newline that is not JSON (what a kill mid-append leaves).
    """
    with open(path, "rb") as handle:  # bytes: a line that is not UTF-8 is named like any other bad line
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                row = json.loads(line)
            except ValueError as error:  # UnicodeDecodeError and JSONDecodeError alike
                line = raw.decode("utf-8", errors="replace")
                if skip_partial_tail and not line.endswith("\n"):
                    return
                problem = (
                    f"not UTF-8 text (byte 0x{raw[error.start]:02x} at column {error.start + 1})"
                    if isinstance(error, UnicodeDecodeError)
                    else f"not valid JSON ({error})"
                )
                raise ValueError(
                    f"{os.fspath(path)}, line {line_number}: {problem}; only the last line can be repaired "
                    "automatically, so fix or move this file"
                ) from None
            if not isinstance(row, dict):
                raise ValueError(
                    f"{os.fspath(path)}, line {line_number}: expected a JSON object, got {type(row).__name__}"
                )
            yield line_number, row


def check_writable_folder(folder: str | os.PathLike, what: str) -> None:
    """Check, before any heavy work and without creating it, that files can be written in `folder`; one line naming
    it otherwise. An existing folder is probed with a short-lived file; a missing one, by its nearest existing parent."""
    folder = os.path.abspath(os.fspath(folder) or ".")
    existing = folder
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise FileExistsError(f"{what} {folder!r}: {existing!r} is a file, not a folder")
    if existing != folder:
        if not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"{what} {folder!r} cannot be created: {existing!r} is not writable; choose another")
        return
    try:
        handle, probe = _create_temporary(os.path.join(folder, "write-check"))
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        raise OSError(f"{what} {folder!r} cannot be written ({error.strerror or error}); choose another") from None


def check_output_file(path: str | os.PathLike, what: str, inputs: tuple[Any, ...] = ()) -> None:
    """Refuse an output file that is a folder, is one of `inputs`, or lies in a folder that cannot be written."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path!r} is a folder; expected a file path")
    for source in inputs:
        if isinstance(source, (str, os.PathLike)) and os.path.exists(source) and os.path.exists(path):
            if os.path.samefile(source, path):
                raise ValueError(f"{what} {path!r} is also an input ({os.fspath(source)!r}); choose another file")
    check_writable_folder(os.path.dirname(os.path.abspath(path)), f"the folder of {what}")


def looks_like_local_path(path: str | os.PathLike) -> bool:
    """Whether a model, folder or dataset name that does not exist was meant as a local path, not a hub name.

    A path that starts with `/`, `.` or `~`, has more than two parts, or whose first part is a local folder (a
    mistyped `runs/dmeo` next to `runs/`) is local: it gets "no such folder" or "no such file" at once instead of a
    wait for the hub ("org/name" whose `org` is not a folder here stays a hub name).
    """
    name = os.fspath(path)
    parts = name.replace(os.sep, "/").split("/")
    return name.startswith(("/", ".", "~")) or len(parts) > 2 or (len(parts) == 2 and os.path.isdir(parts[0]))
