"""Reading bad input (`delia/data/reading.py`): every file either loads, or fails with one line naming the file, the
line and what was expected; never with a pyarrow, datasets or json message, and never by crashing the process."""

from __future__ import annotations

import bz2
import codecs
import gzip
import json
import lzma
import os
import re
import zipfile
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from delia.data import json_check, reading
from delia.data.reading import DataFormatError, read_dataset
from delia.data.rules import load_conversations

os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

NOISE = (
    "pyarrow",
    "Arrow",
    "JSONDecodeError",
    "UnicodeDecodeError",
    "RecursionError",
    "DatasetGenerationError",
    "CastError",
    "ConnectionError",
    "Traceback",
    "JSON parse error",
    "codec can't",
    "Errno",
)


def row(index: int, **extra) -> dict:
    """One good DELIA row."""
    return {
        "messages": [
            {"role": "user", "content": f"question {index}"},
            {"role": "assistant", "content": f"answer {index}"},
        ],
        **extra,
    }


def line(index: int, **extra) -> bytes:
    return json.dumps(row(index, **extra)).encode()


BAD_ROW = json.dumps({"messages": [{"role": "user", "content": "alone"}]}).encode()  # no assistant reply


def write(path: Path, lines: list[bytes], end: bytes = b"\n") -> Path:
    path.write_bytes(end.join(lines) + end)
    return path


def assert_clear(error: BaseException, start: str, *phrases: str) -> str:
    """The message starts with `start` (the file, and line where a line is at fault), says what was expected, holds
    `phrases`, is one line, and carries no pyarrow / datasets / json noise or chained traceback."""
    message = str(error)
    assert message.startswith(start), message
    assert "expected" in message, message
    for phrase in phrases:
        assert phrase in message, f"{phrase!r} not in: {message}"
    for noise in NOISE:
        assert noise not in message, f"{noise!r} leaked into: {message}"
    assert "\n" not in message
    assert error.__cause__ is None
    return message


def at(path: Path, line_number: int) -> str:
    return f"{path}, line {line_number}: "


def labelled(path: Path | str, label: str = "dataset") -> str:
    """The start of a message about a path that could not be opened as data: the caller's label and the path."""
    return f"{label} {str(path)!r}"


# ----------------------------------------------------------------------------------------------------------------------
# 1. Bytes that are not UTF-8
# ----------------------------------------------------------------------------------------------------------------------


def with_bad_byte(text: bytes, byte: bytes = b"\xff") -> tuple[bytes, int]:
    """`text` with `byte` put in the first answer's text, and the 1-based column where it lands."""
    position = text.index(b"answer")
    return text[:position] + byte + text[position:], position + 1


@pytest.mark.parametrize(
    ("before", "after"), [(2, 2), (0, 3), (6000, 1)], ids=["middle", "first-line", "after-1MB-block"]
)
def test_invalid_utf8_names_file_line_byte_and_column(tmp_path, before, after):
    pad = "x" * 200 if before > 1000 else ""
    bad, column = with_bad_byte(line(before, pad=pad))
    path = write(tmp_path / "cache.jsonl", [line(i, pad=pad) for i in range(before)] + [bad] + [line(9)] * after)
    if before > 1000:
        assert path.stat().st_size > 1 << 20  # the bad line lies beyond pyarrow's first block
    for read in (lambda: read_dataset(path, "cache"), lambda: load_conversations(path)):
        with pytest.raises(DataFormatError) as error:
            read()
        assert_clear(
            error.value,
            at(path, before + 1),
            f"not valid UTF-8 (byte 0xff at column {column}); expected UTF-8 text",
        )


def test_invalid_utf8_after_the_first_10mb_batch_and_in_a_field_name(tmp_path):
    good = [line(i, pad="y" * 1000) for i in range(10_500)]
    bad, column = with_bad_byte(line(1, pad="y" * 1000), b"\xc3(")
    path = write(tmp_path / "big.jsonl", good + [bad])
    assert path.stat().st_size > 10 << 20
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, at(path, 10_501), f"byte 0xc3 at column {column}")

    key = write(tmp_path / "key.jsonl", [line(0), b'{"messages": [], "k\xe9y": 1}'])
    with pytest.raises(DataFormatError) as error:
        read_dataset(key, "cache")
    assert_clear(error.value, at(key, 2), "not valid UTF-8 (byte 0xe9 at column 20)")


def test_latin1_file_is_named_as_another_encoding(tmp_path):
    text = "\n".join(json.dumps(row(i), ensure_ascii=False).replace("answer", "réponse") for i in range(3))
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    message = assert_clear(error.value, at(path, 1), "byte 0xe9", "Latin-1", "re-save it as UTF-8")
    assert re.search(r"column \d+\)", message)


# ----------------------------------------------------------------------------------------------------------------------
# 2. Byte-order mark and line ends: these simply load
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "ends", "final"),
    [
        (codecs.BOM_UTF8, [b"\n"] * 3, b"\n"),
        (b"", [b"\r\n"] * 3, b"\r\n"),
        (codecs.BOM_UTF8, [b"\r\n", b"\n", b"\r\n"], b""),
        (b"", [b"\n", b"\r\n", b"\n"], b""),
        (b"", [b"\r"] * 3, b"\r"),
    ],
    ids=["bom", "crlf", "bom-mixed-no-final-newline", "mixed-no-final-newline", "cr-only"],
)
def test_bom_and_line_ends_load_the_same_rows_and_name_lines(tmp_path, start, ends, final):
    rows = [line(i) for i in range(4)]
    body = start + b"".join(text + end for text, end in zip(rows, [*ends, final], strict=True))
    path = tmp_path / "rows.jsonl"
    path.write_bytes(body)
    loaded = load_conversations(path)
    assert loaded["messages"] == [row(i)["messages"] for i in range(4)]

    # A bad row after a blank line is named by its line, whatever the line ends.
    path.write_bytes(start + rows[0] + ends[0] + ends[1] + BAD_ROW + ends[2] + rows[1] + final)
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 3), "field 'messages': expected at least a user message")


def test_bom_in_the_middle_of_a_file_is_named(tmp_path):
    path = write(tmp_path / "joined.jsonl", [line(0), codecs.BOM_UTF8 + line(1)])
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, at(path, 2), "byte-order mark", "as if two files were joined")


# ----------------------------------------------------------------------------------------------------------------------
# 3. Other encodings and binary files
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("encoding", "named"),
    [("utf-16", "UTF-16"), ("utf-16-be", "UTF-16"), ("utf-16-le", "UTF-16"), ("utf-32", "UTF-32")],
)
def test_utf16_and_utf32_files_say_to_resave_as_utf8(tmp_path, encoding, named):
    text = "\n".join(json.dumps(row(i)) for i in range(3)) + "\n"
    path = tmp_path / "wide.jsonl"
    data = text.encode(encoding)
    path.write_bytes(codecs.BOM_UTF16_BE + data if encoding == "utf-16-be" else data)
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, f"{path}: looks like {named} text", "expected UTF-8: re-save it as UTF-8")


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4, "a PNG image"),
        (bytes(range(256)) * 16, "binary data"),
        (b"%PDF-1.7\n" + b"x" * 100, "a PDF document"),
    ],
    ids=["png", "random-bytes", "pdf"],
)
def test_binary_file_named_jsonl(tmp_path, data, named):
    path = tmp_path / "data.jsonl"
    path.write_bytes(data)
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, f"{path}: ", named, "not text", "expected a JSON lines file")


# ----------------------------------------------------------------------------------------------------------------------
# 4. Folders, links, permissions, odd paths
# ----------------------------------------------------------------------------------------------------------------------


def test_folder_of_jsonl_files_names_them(tmp_path):
    folder = tmp_path / "shards"
    folder.mkdir()
    for name in ("b.jsonl", "a.jsonl"):
        write(folder / name, [line(0)])
    with pytest.raises(DataFormatError) as error:
        load_conversations(folder)
    assert_clear(
        error.value,
        labelled(folder),
        "the folder is not a saved dataset (expected one written by Dataset.save_to_disk)",
        "2 data file(s) (a.jsonl, b.jsonl): pass one of them instead",
    )


def test_empty_folder_and_folder_named_like_a_file(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataFormatError) as error:
        read_dataset(empty, "cache")
    assert_clear(error.value, labelled(empty, "cache"), "not a saved dataset", "it is empty")

    named = tmp_path / "cache.jsonl"
    named.mkdir()
    with pytest.raises(DataFormatError) as error:
        read_dataset(named, "cache")
    assert_clear(error.value, labelled(named, "cache"), "a folder named like a file")


def test_saved_dataset_dict_without_the_split(tmp_path):
    folder = tmp_path / "saved"
    DatasetDict({"test": Dataset.from_list([row(0)])}).save_to_disk(str(folder))
    with pytest.raises(DataFormatError) as error:
        load_conversations(folder)
    assert_clear(error.value, f"{folder}: has no split 'train'", "available splits: test")
    assert len(load_conversations(folder, split="test")) == 1


def test_damaged_saved_dataset(tmp_path):
    for damage in ("remove", "truncate"):
        folder = tmp_path / damage
        Dataset.from_list([row(i) for i in range(3)]).save_to_disk(str(folder))
        arrow = next(folder.glob("*.arrow"))
        if damage == "remove":
            arrow.unlink()
        else:
            arrow.write_bytes(arrow.read_bytes()[:50])
        with pytest.raises(DataFormatError) as error:
            read_dataset(folder, "cache")
        assert_clear(error.value, labelled(folder, "cache"), "looks like a saved dataset but could not be read")


def test_broken_symlink(tmp_path):
    link = tmp_path / "cache.jsonl"
    link.symlink_to(tmp_path / "gone.jsonl")
    with pytest.raises(FileNotFoundError) as error:
        read_dataset(link, "cache")
    assert_clear(error.value, labelled(link, "cache"), "is a symbolic link to", "gone.jsonl', which does not exist")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file(tmp_path):
    locked = write(tmp_path / "locked.jsonl", [line(0)])
    locked.chmod(0)
    with pytest.raises(PermissionError) as error:
        read_dataset(locked, "cache")
    assert_clear(error.value, labelled(locked, "cache"), "permission denied")


def test_pipe_is_not_a_regular_file(tmp_path):
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    with pytest.raises(DataFormatError) as error:
        read_dataset(pipe, "cache")
    assert_clear(error.value, labelled(pipe, "cache"), "is not a regular file")


def test_empty_path_tilde_and_stray_spaces(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError) as error:
        read_dataset("", "cache")
    assert_clear(error.value, "cache: the path is empty", "expected a JSON lines file")

    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "rows.jsonl", [line(0), line(1)])
    assert len(load_conversations("~/rows.jsonl")) == 2  # `~` is the home folder, as in a shell
    with pytest.raises(FileNotFoundError) as error:
        read_dataset("~/nope.jsonl", "cache")
    assert_clear(error.value, "cache '~/nope.jsonl' (" + str(tmp_path / "nope.jsonl") + ") not found")

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as error:
        read_dataset("rows.jsonl ", "cache")
    assert_clear(error.value, "cache 'rows.jsonl ' not found", "'rows.jsonl', without the surrounding spaces, exists")


def test_names_that_are_neither_paths_nor_hub_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reading, "load_dataset", lambda *a, **k: pytest.fail("not a hub name: must not be looked up"))
    for name in ("not a hub name!", "a/b/c", "data/train.jsonl", "./rows", "/no/such/folder"):
        with pytest.raises(FileNotFoundError) as error:
            read_dataset(name, "cache")
        assert_clear(error.value, f"cache {name!r} not found", "expected a JSONL file")


@pytest.mark.parametrize(
    ("failure", "reason"),
    [
        (ConnectionError("Couldn't reach 'someone/data' on the Hub (LocalEntryNotFoundError)"), "could not be reached"),
        (datasets.exceptions.DatasetNotFoundError("Dataset 'someone/data' doesn't exist"), "has no dataset of that"),
        (ValueError("Unknown split 'train'. Should be one of ['test']."), "loading it from the Hugging Face Hub"),
    ],
    ids=["offline", "no-such-dataset", "other"],
)
def test_hub_name_that_does_not_load_fails_in_one_line(monkeypatch, failure, reason):
    def load_dataset(name, split):
        raise failure

    monkeypatch.setattr(reading, "load_dataset", load_dataset)
    with pytest.raises(FileNotFoundError) as error:
        read_dataset("someone/data", "cache")
    message = assert_clear(error.value, "cache 'someone/data': no such file or folder", reason)
    assert str(failure) not in message and type(failure).__name__ not in message


def test_datasets_in_memory_and_hub_names_still_load(monkeypatch):
    dataset = Dataset.from_list([row(0), row(1)])
    assert read_dataset(dataset, "cache")[0] is dataset
    assert read_dataset(DatasetDict({"train": dataset}), "cache")[0] is dataset
    monkeypatch.setattr(reading, "load_dataset", lambda name, split: dataset)
    loaded, origin = read_dataset("someone/data", "cache")
    assert loaded is dataset and origin.where(1) == "hub dataset 'someone/data', row 1"
    with pytest.raises(TypeError, match=r"^cache: expected a datasets\.Dataset or a path"):
        read_dataset(42, "cache")


# ----------------------------------------------------------------------------------------------------------------------
# 5. Other file kinds: JSON arrays and objects, CSV, Parquet, compressed files
# ----------------------------------------------------------------------------------------------------------------------


def test_json_array_errors_name_the_row_or_the_line(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([row(0), row(1), json.loads(BAD_ROW)], indent=2), encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, f"{path}, row 2: field 'messages': expected at least")

    path.write_text("[\n" + json.dumps(row(0)) + ",\n" + '{"messages": [}' + "\n]\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 3), "malformed JSON (Expecting value at column 15)", "a JSON array of objects")

    path.write_text(json.dumps([row(0), 7]), encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, f"{path}, row 1: expected a JSON object", "got number")

    path.write_text("[]", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, f"{path}: expected a JSON array of objects", "got an empty array")


def test_json_object_holding_the_rows_in_a_field_or_one_pretty_row(tmp_path):
    path = tmp_path / "wrapped.json"
    path.write_text(json.dumps({"data": [row(0), row(1)]}, indent=2), encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 1), "missing field 'messages'", "fields found: 'data'")

    path.write_text(json.dumps(row(0), indent=2), encoding="utf-8")  # one row, pretty-printed: loads
    assert load_conversations(path)["messages"] == [row(0)["messages"]]


def test_pretty_printed_rows_load_and_a_bad_one_is_named_by_its_first_line(tmp_path):
    path = tmp_path / "pretty.jsonl"
    pretty = [json.dumps(row(i), indent=2) for i in range(2)]  # 12 lines each
    path.write_text("\n".join([*pretty, json.dumps(json.loads(BAD_ROW), indent=2)]) + "\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 25), "field 'messages': expected at least")

    path.write_text(pretty[0] + "\n" + pretty[1][:-2] + "\n" + pretty[0] + "\n", encoding="utf-8")  # "}" lost
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, at(path, 13), "the value that starts on this line is not closed", "at line 24, column 1")


def test_csv_is_refused_and_parquet_loads(tmp_path):
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,completion\nhi,there\n", encoding="utf-8")
    with pytest.raises(DataFormatError) as error:
        load_conversations(csv)
    assert_clear(error.value, f"{csv}: CSV and TSV files are not read", "a JSON lines file", "a Parquet file")

    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist([row(0), row(1)]), parquet)
    assert load_conversations(parquet)["messages"] == [row(0)["messages"], row(1)["messages"]]
    pq.write_table(pa.Table.from_pylist([row(0), json.loads(BAD_ROW)]), parquet)
    with pytest.raises(DataFormatError) as error:
        load_conversations(parquet)
    assert_clear(error.value, f"{parquet}, row 1: field 'messages'")

    parquet.write_bytes(b"PAR1" + b"\x00" * 40)
    with pytest.raises(DataFormatError) as error:
        read_dataset(parquet, "cache")
    assert_clear(error.value, f"{parquet}: could not be read as Parquet")


@pytest.mark.parametrize(
    ("suffix", "compress"), [(".jsonl.gz", gzip.compress), (".jsonl.bz2", bz2.compress), (".jsonl.xz", lzma.compress)]
)
def test_compressed_json_lines_load_and_name_lines_inside(tmp_path, suffix, compress):
    path = tmp_path / f"rows{suffix}"
    path.write_bytes(compress(b"\n".join([line(0), line(1)]) + b"\n"))
    assert load_conversations(path)["messages"] == [row(0)["messages"], row(1)["messages"]]
    path.write_bytes(compress(b"\n".join([line(0), b"", BAD_ROW]) + b"\n"))
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 3), "field 'messages'")
    path.write_bytes(compress(b"\n".join([line(0), b"{broken"]) + b"\n"))
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 2), "malformed JSON")


def test_damaged_gzip_and_zip_archive(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    path.write_bytes(gzip.compress(b"\n".join(line(i) for i in range(2000)))[:3000])
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, f"{path}: the compressed data is damaged or cut short")

    archive = tmp_path / "rows.jsonl"
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("a.jsonl", line(0))
    with pytest.raises(DataFormatError) as error:
        read_dataset(archive, "cache")
    assert_clear(error.value, f"{archive}: looks like a zip archive")


# ----------------------------------------------------------------------------------------------------------------------
# 6. JSON edge cases
# ----------------------------------------------------------------------------------------------------------------------


def test_nan_infinity_and_huge_integers_load(tmp_path):
    lines = [line(0)[:-1] + b', "score": NaN}', line(1)[:-1] + b', "score": -Infinity}']
    lines.append(line(2)[:-1] + b', "score": 123456789012345678901234567890}')
    loaded = load_conversations(write(tmp_path / "numbers.jsonl", lines))
    assert loaded["messages"] == [row(i)["messages"] for i in range(3)]
    assert loaded[1]["score"] == float("-inf") and loaded[2]["score"] == pytest.approx(1.2345678901234568e29)


@pytest.mark.parametrize(
    ("value", "expected"),
    [(b'"hello"', "got string"), (b"42", "got number"), (b"null", "got null"), (b"[1, 2]", "got array")],
)
@pytest.mark.parametrize("where", [0, 2], ids=["first-line", "third-line"])
def test_a_line_that_is_not_an_object(tmp_path, value, expected, where):
    lines = [line(0), line(1), line(2)]
    lines.insert(where, value)
    path = write(tmp_path / "values.jsonl", lines)
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, at(path, where + 1), "expected a JSON object such as", expected)


@pytest.mark.parametrize(
    ("bad", "phrase"),
    [
        (line(5)[:-1] + b",}", "malformed JSON (Expecting property name enclosed in double quotes at column"),
        (line(5) + b" 7", "got number"),
        (line(5).replace(b"answer", b"a\tb"), "malformed JSON (Invalid control character at column 93)"),
        (b"// a comment", "malformed JSON (Expecting value at column 1)"),
        (b"\x0c", "malformed JSON (Expecting value at column 1)"),
        (b'{"messages": [], "messages": []}', "field 'messages' appears twice in one object; expected each field once"),
        (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "field 'messages'[0].content: a \\ud800-\\udfff"),
        (line(5)[:-1] + b', "deep": ' + b"[" * 70 + b"]" * 70 + b"}", "nested too deeply; expected at most 63 levels"),
        (b'{"deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
        (b'{"deep": ' + b'{"a": ' * 20_000 + b"1" + b"}" * 20_000 + b"}", "nested too deeply"),
        (b'{"deep": ' + b"[" * 30_000, "nested too deeply"),
    ],
    ids=[
        "trailing-comma",
        "object-then-number",
        "raw-tab-in-string",
        "comment",
        "form-feed",
        "duplicate-field",
        "lone-surrogate",
        "71-levels",
        "100000-levels",
        "20000-objects",
        "30000-unclosed",
    ],
)
def test_json_edge_cases_name_the_line(tmp_path, bad, phrase):
    path = write(tmp_path / "edge.jsonl", [line(0), line(1), bad, line(3)])
    for read in (lambda: read_dataset(path, "cache"), lambda: load_conversations(path)):
        with pytest.raises(DataFormatError) as error:
            read()
        assert_clear(error.value, at(path, 3), phrase)


def test_cut_off_lines_are_named_where_their_value_starts(tmp_path):
    path = tmp_path / "cut.jsonl"
    path.write_bytes(line(0) + b"\n" + line(1) + b"\n" + line(2)[:-2])
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 3), "the file ends before the value is closed: Expecting ',' delimiter at col")

    path.write_bytes(line(0) + b"\n" + line(1) + b"\n" + line(2)[:60])
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 3), "the line ends inside a string that starts at column 59, as if cut short")

    path = write(tmp_path / "cut_mid.jsonl", [line(0), line(1)[:-2], line(2), line(3)])
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 2), "the value that starts on this line is not closed", "at line 3, column 1")

    path = write(tmp_path / "cut_in_string.jsonl", [line(0), line(1)[:60], line(2)])
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 2), "the line ends inside a string, at column 61, as if cut short")


def test_two_objects_on_a_line_load_and_later_lines_keep_their_numbers(tmp_path):
    path = write(tmp_path / "two.jsonl", [line(0) + b" " + line(1), line(2), b"", BAD_ROW])
    assert len(read_dataset(path, "cache")[0]) == 4
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 4), "field 'messages': expected at least")


def test_many_brackets_on_one_line_is_not_too_deep(tmp_path):
    messages = [message for i in range(3000) for message in row(i)["messages"]]  # > CRASH_GUARD_BRACKETS
    path = write(tmp_path / "long.jsonl", [line(0), json.dumps({"messages": messages}).encode()])
    assert len(load_conversations(path)[1]["messages"]) == 6000


def test_empty_object_among_rows_reaches_the_rules(tmp_path):
    path = write(tmp_path / "empty_object.jsonl", [line(0), line(1), b"{}", line(2)])
    assert len(read_dataset(path, "cache")[0]) == 4
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 3), "missing field 'messages'")


def test_field_with_different_types_on_different_lines(tmp_path):
    other = row(1)
    other["messages"][1]["content"] = {"text": "answer 1"}
    path = write(tmp_path / "mixed.jsonl", [line(0, id="a"), json.dumps(other | {"id": 7}).encode()])
    assert len(read_dataset(path, "cache")[0]) == 2  # datasets stores mixed types as JSON
    with pytest.raises(DataFormatError) as error:
        load_conversations(path)
    assert_clear(error.value, at(path, 2), "field 'messages'[1].content: expected a non-empty string, got dict")


def test_type_conflict_explains_a_refusal_when_every_line_is_valid_json(tmp_path, monkeypatch):
    """A datasets that refuses mixed types (older versions) gets the first conflicting line named."""
    path = write(tmp_path / "mixed.jsonl", [line(0, id="a"), line(1, id="b"), line(2, id=3)])

    def refuse(path: str, **options) -> Dataset:
        raise pa.ArrowInvalid("JSON parse error: Column(/id) changed from string to number in row 2")

    monkeypatch.setattr(reading, "_from_json", refuse)
    with pytest.raises(DataFormatError) as error:
        read_dataset(path, "cache")
    assert_clear(error.value, at(path, 3), "field 'id': expected string (as on earlier lines), got number")


def test_field_first_seen_after_the_first_10mb_loads(tmp_path):
    good = [line(i, pad="z" * 1000) for i in range(10_500)]
    path = write(tmp_path / "late.jsonl", [*good, line(1, pad="z", source="late")])
    assert path.stat().st_size > 10 << 20
    loaded = load_conversations(path)
    assert len(loaded) == 10_501 and loaded[-1]["source"] == "late" and loaded[0]["source"] is None


# ----------------------------------------------------------------------------------------------------------------------
# Speed: a good file is not parsed line by line in Python
# ----------------------------------------------------------------------------------------------------------------------


def test_good_file_is_read_without_a_python_pass(tmp_path, monkeypatch):
    path = write(tmp_path / "good.jsonl", [codecs.BOM_UTF8 + line(0)] + [line(i) for i in range(1, 500)])

    def no_python_pass(*args, **kwargs):
        pytest.fail("a good file was parsed line by line in Python")

    monkeypatch.setattr(json_check, "first_bad_line", no_python_pass)
    monkeypatch.setattr(json_check, "json_values", no_python_pass)
    dataset, origin = read_dataset(path, "cache")
    assert len(dataset) == 500 and origin.rows == 500
